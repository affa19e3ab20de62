"""Determinism: the same inputs give the same kept sets on every backend, and on every run.

Selection ranks through one order everywhere (``selection.order_keys``: score descending, ties to the
lower position, NaN below everything, ``-0.0 == +0.0``), so the reference, the Triton kernels and the
CUDA extension must agree **exactly**, ties included - checked here on score rows made of ties (a few
distinct values, all equal, NaN, +-0, +-inf, denormals), with per-row budgets, lengths, sinks,
recent windows and protected tokens, across several tiles of the Triton kernel, and against a naive
sort-based oracle.

End to end, every method runs on a tiny random Llama through the transformers integration with
``backend="reference"`` and ``backend="triton"``: every eviction the method returns (prefill and
decoding), the generated tokens and the memory statistics must be identical, and a second run must
repeat the first bit for bit. Scores of the two backends differ by fp32 rounding only; the test
models are fixed (seeded), so a near-tie flipped by rounding would show up here as a failure rather
than as flakiness.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import _fixtures
from _fixtures import greedy_fill
from conftest import HAS_CUDA, devices_for_triton

import kvpress_kernels as kk
import kvpress_kernels.ops.selection as sel
from kvpress_kernels._backend import cuda_ext_status
from kvpress_kernels.ops import select_segments, select_topk
from kvpress_kernels.ops.selection import order_keys

NAN, INF = float("nan"), float("inf")
DENORM = 1e-40  # below fp32's smallest normal: a backend flushing denormals would tie it with 0

# Backends compared with the reference: Triton always (interpreter on CPU), the CUDA extension where
# it is built and a GPU is present.
KERNEL_BACKENDS = [pytest.param("triton", marks=pytest.mark.triton)]
if HAS_CUDA and cuda_ext_status()[0] is not None:
    KERNEL_BACKENDS.append(pytest.param("cuda", marks=pytest.mark.gpu))


def _device(backend):
    return "cuda" if backend == "cuda" else devices_for_triton()[0]


# ------------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------------

def rank_key(x: float, j: int):
    """Sort key of the documented order: numbers descending (-0.0 == +0.0), NaN last, then position."""
    return (1, 0.0, j) if x != x else (0, -x, j)


def naive_topk(scores: torch.Tensor, budgets, lengths, sink=0, recent=0, protect=None) -> list[list[int]]:
    out = []
    for r, row in enumerate(scores.double().tolist()):
        L = int(lengths[r])
        prot = {j for j in range(L) if j < sink or j >= L - recent or (protect is not None and bool(protect[r, j]))}
        rest = sorted((j for j in range(L) if j not in prot), key=lambda j: rank_key(row[j], j))
        out.append(sorted(prot) if budgets[r] <= len(prot) else sorted(prot | set(rest[:budgets[r] - len(prot)])))
    return out


def naive_segments(scores: torch.Tensor, sizes: list[int], budget: int, policy: str, protect=None) -> list[list[bool]]:
    out = []
    for r, row in enumerate(scores.double().tolist()):
        prot = [bool(protect[r, s]) if protect is not None else False for s in range(len(row))]
        rem = budget - sum(sz for sz, p in zip(sizes, prot) if p)
        taken = greedy_fill(sorted((s for s in range(len(row)) if not prot[s]), key=lambda s: rank_key(row[s], s)),
                            sizes, rem, policy)
        out.append([p or s in taken for s, p in enumerate(prot)])
    return out


def kept_lists(kept_idx: torch.Tensor) -> list[list[int]]:
    return [[j for j in row if j >= 0] for row in kept_idx.cpu().tolist()]


# ------------------------------------------------------------------------------------------------
# Token selection
# ------------------------------------------------------------------------------------------------

def tie_rows(kind: str, R: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "three_values":
        return torch.randint(0, 3, (R, N), generator=gen).float()
    if kind == "all_equal":
        return torch.full((R, N), 0.25)
    if kind == "specials":  # every special value, many times: NaN, +-inf, +-0, denormals, ties
        pool = torch.tensor([NAN, INF, -INF, 0.0, -0.0, DENORM, -DENORM, 1.0, 1.0, -1.0])
        return pool[torch.randint(0, len(pool), (R, N), generator=gen)]
    if kind == "all_nan":
        return torch.full((R, N), NAN)
    if kind == "fp16_collisions":  # distinct in fp32, equal once stored in fp16: ties by position
        return (1.0 + torch.randint(0, 4, (R, N), generator=gen).float() * 1e-4)
    raise AssertionError(kind)


KINDS = ["three_values", "all_equal", "specials", "all_nan", "fp16_collisions"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,max_block", [(1, None), (7, None), (41, 16)])
def test_select_topk_ties_identical_on_every_backend(backend, kind, dtype, N, max_block, monkeypatch):
    if max_block is not None:  # walk several tiles of the Triton kernel: ties must carry across them
        monkeypatch.setattr(sel, "_MAX_BLOCK", max_block)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(N * 31 + KINDS.index(kind))
    R = 6
    scores = tie_rows(kind, R, N, gen).to(dtype)
    lengths = torch.tensor([N, 0, max(N - 3, 0), N, 1 if N else 0, N // 2])
    protect = torch.rand(R, N, generator=gen) < 0.15
    sink, recent = min(2, N), min(1, N)
    n_prot = [len({j for j in range(int(L)) if j < sink or j >= L - recent or protect[r, j]})
              for r, L in enumerate(lengths.tolist())]
    budgets = [min(int(L), p + (int(L) - p) // (r + 1)) for r, (L, p) in enumerate(zip(lengths.tolist(), n_prot))]
    args = dict(lengths=lengths, sink=sink, recent=recent, protect=protect, max_budget=max(budgets))
    want = naive_topk(scores, budgets, lengths, sink, recent, protect)
    ref_mask, ref_idx = select_topk(scores, torch.tensor(budgets), backend="reference", **args)
    assert kept_lists(ref_idx) == want
    on_dev = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    runs = [select_topk(scores.to(dev), torch.tensor(budgets, device=dev), backend=backend, **on_dev) for _ in range(2)]
    for mask, idx in runs:
        assert torch.equal(idx.cpu(), ref_idx), f"{backend} kept {kept_lists(idx)}, reference {want}"
        assert torch.equal(mask.cpu(), ref_mask)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_select_topk_budget_at_a_tie_boundary(backend):
    """The cut falls inside a run of equal scores: the lower positions win, on every backend."""
    dev = _device(backend)
    scores = torch.tensor([[0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 0.5, -0.0, 0.0, 0.5]])
    for budget in range(11):
        want = naive_topk(scores, [budget], [10])
        _, ref = select_topk(scores, budget, backend="reference")
        _, got = select_topk(scores.to(dev), budget, backend=backend)
        assert kept_lists(ref) == kept_lists(got) == want, budget
    # budget 4 cuts the 0.5-run after its first two members
    assert naive_topk(scores, [4], [10]) == [[0, 1, 2, 4]]


def test_order_keys_is_the_documented_order():
    vals = [INF, 3.0, 1.0, DENORM, 0.0, -0.0, -DENORM, -1.0, -INF, NAN]
    keys = order_keys(torch.tensor(vals)).tolist()
    assert keys == sorted(keys, reverse=True), keys          # descending with the documented order
    assert keys[4] == keys[5]                                 # -0.0 == +0.0
    assert len(set(keys[:4])) == 4 and keys[3] > keys[4]      # a denormal is above zero, not flushed
    assert keys[-1] < keys[-2]                                # NaN below -inf
    nans = torch.tensor([NAN, -NAN]).float()
    assert len(set(order_keys(nans).tolist())) == 1           # every NaN the same: ties by position


# ------------------------------------------------------------------------------------------------
# Segment selection
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("policy", ["skip", "stop"])
@pytest.mark.parametrize("kind", ["three_values", "all_equal", "specials"])
@pytest.mark.parametrize("max_block", [None, 16])
def test_select_segments_ties_identical_on_every_backend(backend, policy, kind, max_block, monkeypatch):
    if max_block is not None:
        monkeypatch.setattr(sel, "_MAX_BLOCK", max_block)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(7)
    R, S = 5, 37
    scores = tie_rows(kind, R, S, gen)
    sizes = torch.randint(0, 6, (S,), generator=gen)
    protect = torch.rand(R, S, generator=gen) < 0.1
    need = int((sizes.unsqueeze(0) * protect).sum(1).max())
    budget = need + 40
    want = naive_segments(scores, sizes.tolist(), budget, policy, protect)
    ref = select_segments(scores, sizes, budget, policy=policy, protect=protect, backend="reference")
    assert ref.tolist() == want
    for _ in range(2):
        got = select_segments(scores.to(dev), sizes.to(dev), budget, policy=policy, protect=protect.to(dev),
                              backend=backend)
        assert torch.equal(got.cpu(), ref)


# ------------------------------------------------------------------------------------------------
# End to end: every method on a tiny random Llama, reference vs Triton
# ------------------------------------------------------------------------------------------------

def tiny_llama(Hq=4, Hkv=2, D=8, layers=2, seed=0):
    return _fixtures.tiny_llama(Hq, Hkv, D, layers, seed, max_positions=128)


def methods():
    """Every method, with options that make each one evict at prefill and (where it can) while decoding."""
    return {
        "SnapKV": lambda: kk.SnapKV(0.4, window_size=4, kernel_size=3),
        "PyramidKV": lambda: kk.PyramidKV(0.4, window_size=4, kernel_size=3, beta=2),
        "ChunkKV": lambda: kk.ChunkKV(0.4, chunk_size=3, window_size=4, kernel_size=3, reuse_every=2),
        "StreamingLLM": lambda: kk.StreamingLLM(0.4, n_sink=2),
        "H2O": lambda: kk.H2O(0.4),
        "TOVA": lambda: kk.TOVA(0.4),
        "KNorm": lambda: kk.KNorm(0.4),
        "ShotKV": lambda: kk.ShotKV(0.4, 0.5, decode_recent=1),
    }


SHOTS = [[(1, 6), (6, 12), (12, 18)], [(0, 4), (4, 9), (9, 14)]]


def run_recording(model, method, backend, device="cpu"):
    """Generate with ``method`` and record every eviction it returns, in call order."""
    events = []
    prefill, decode = method.prefill, method.decode

    def rec(kind, fn):
        def wrapped(inputs):
            ev = fn(inputs)
            events.append((kind, inputs.layer, None if ev is None else ev.kept_idx.cpu().clone(),
                           None if ev is None or ev.new_lengths is None else np.asarray(ev.new_lengths).copy()))
            return ev
        return wrapped

    method.prefill, method.decode = rec("prefill", prefill), rec("decode", decode)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0                                  # left padding: prompts of 24 and 19
    try:
        out, stats = kk.generate(model, ids.to(device), method, attention_mask=mask.to(device), max_new_tokens=4,
                                 page_size=4,
                                 backend=backend, shots=SHOTS if isinstance(method, kk.ShotKV) else None)
    finally:
        del method.prefill, method.decode
    memory = {k: v for k, v in stats.items() if k.startswith("kv_")}
    return out.cpu(), events, memory


def assert_same_run(a, b, what):
    (out_a, ev_a, mem_a), (out_b, ev_b, mem_b) = a, b
    assert torch.equal(out_a, out_b), f"{what}: generated tokens differ"
    assert mem_a == mem_b, f"{what}: memory statistics differ"
    assert [(k, layer) for k, layer, _, _ in ev_a] == [(k, layer) for k, layer, _, _ in ev_b]
    for (kind, layer, ka, na), (_, _, kb, nb) in zip(ev_a, ev_b):
        assert (ka is None) == (kb is None), f"{what}: {kind} of layer {layer} evicts on one side only"
        if ka is not None:
            assert torch.equal(ka, kb), f"{what}: {kind} of layer {layer} keeps {ka.tolist()} vs {kb.tolist()}"
            assert (na is None and nb is None) or np.array_equal(na, nb)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("name", list(methods()))
def test_method_repeats_itself(model, name):
    first = run_recording(model, methods()[name](), "reference")
    assert any(ev is not None for _, _, ev, _ in first[1]), "the method never evicted: the test would be vacuous"
    assert_same_run(first, run_recording(model, methods()[name](), "reference"), f"{name} run twice")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("name", list(methods()))
def test_method_same_kept_sets_reference_and_triton(model, name, device):
    model.to(device)
    try:
        ref = run_recording(model, methods()[name](), "reference", device)
        tri = run_recording(model, methods()[name](), "triton", device)
        assert_same_run(ref, tri, f"{name}: reference vs triton")
        if name in ("H2O", "ShotKV"):  # evictions while decoding come from the kernel's probabilities
            assert_same_run(tri, run_recording(model, methods()[name](), "triton", device), f"{name}: triton twice")
    finally:
        model.to("cpu")
