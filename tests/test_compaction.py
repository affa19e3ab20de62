"""In-place compaction (kvpress_kernels.ops.compaction).

The oracle is a naive per-row Python implementation of the plan (list comprehensions for holes and
sources, one Python-level move at a time); the reference must equal it exactly, the Triton kernel
must equal the reference exactly (data movement: torch.equal on whole pools, lengths, positions).
"""

import math

import pytest
import torch
from _fixtures import assert_rejects_bad_paged_layout
from conftest import HAS_CUDA, devices_for_triton

from kvpress_kernels._backend import cuda_ext_status
from kvpress_kernels.ops.compaction import compact_, compact_ref, compaction_plan_ref

MODES = ("random", "all", "one", "none", "tail", "head")


def _kept_for(n: int, mode: str, g: torch.Generator) -> list[int]:
    if n == 0 or mode == "none":
        return []
    if mode == "all":
        return list(range(n))
    if mode == "one":
        return [int(torch.randint(n, (1,), generator=g))]
    if mode == "tail":   # StreamingLLM-like recent window: every kept token moves
        return list(range(n - max(1, n // 3), n))
    if mode == "head":   # keep a prefix: nothing moves, only the length shrinks
        return list(range(max(1, n // 2)))
    p = float(torch.rand((), generator=g))
    return [s for s in range(n) if float(torch.rand((), generator=g)) < p]


def make_case(lead=(2, 3), page_size=4, head_dim=8, dtype=torch.float16, max_len=23, k_extra=3, seed=0,
              idx_dtype=torch.int64, modes=MODES, with_pos=True, pool="contiguous", device="cpu", K=None):
    """Random pools, a page table (distinct pages, spare pages never referenced), ragged lengths and
    one kept set per row, the row's selection mode cycling through ``modes``."""
    g = torch.Generator().manual_seed(seed)
    rows = math.prod(lead)
    max_pages = max(1, -(-max_len // page_size))
    num_pages = rows * max_pages + 3
    lengths = torch.randint(0, max_len + 1, (rows,), generator=g)
    lengths[0] = max_len  # at least one full row
    if rows > 1:
        lengths[1] = 0    # and one empty row
    table = torch.randperm(num_pages, generator=g)[: rows * max_pages].reshape(*lead, max_pages).to(torch.int32)
    shape = (num_pages, page_size, head_dim)
    if pool == "contiguous":
        k = torch.randn(shape, generator=g).to(dtype)
        v = torch.randn(shape, generator=g).to(dtype)
    elif pool == "slice_d":     # a slice of a wider pool along head_dim (last stride 1, odd offset)
        k = torch.randn((num_pages, page_size, head_dim + 5), generator=g).to(dtype)[..., 1: 1 + head_dim]
        v = torch.randn((num_pages, page_size, head_dim + 3), generator=g).to(dtype)[..., 3: 3 + head_dim]
    elif pool == "strided_pages":   # every other page of a bigger pool
        k = torch.randn((2 * num_pages, page_size, head_dim), generator=g).to(dtype)[::2]
        v = torch.randn((num_pages, 2, page_size, head_dim), generator=g).to(dtype)[:, 1]
    else:
        raise AssertionError(pool)
    pos = torch.randint(0, 10_000, (num_pages, page_size), generator=g, dtype=torch.int32) if with_pos else None
    kept_rows = [_kept_for(int(lengths[r]), modes[r % len(modes)], g) for r in range(rows)]
    if K is None:
        K = max([len(s) for s in kept_rows] + [0]) + k_extra
    kept = torch.full((rows, K), -1, dtype=idx_dtype)
    for r, s in enumerate(kept_rows):
        kept[r, : len(s)] = torch.tensor(s, dtype=idx_dtype)
    case = dict(k_pages=k, v_pages=v, page_table=table, lengths=lengths.to(torch.int32).reshape(lead),
                kept_idx=kept.reshape(*lead, K), pos_pages=pos)
    return {n: (t.to(device) if t is not None else None) for n, t in case.items()}


def clone_case(case):
    # clone() keeps the strides of non-contiguous pools (preserve_format on a non-dense view gives a
    # dense copy, so rebuild the view on a copy of its base where needed).
    out = {}
    for n, t in case.items():
        if t is None:
            out[n] = None
        elif t.is_contiguous():
            out[n] = t.clone()
        else:
            base = t._base.clone()
            out[n] = base.as_strided(t.shape, t.stride(), t.storage_offset())
    return out


def naive_compact(case):
    """Independent oracle: per row, holes = non-kept slots below n, sources = kept slots from n on,
    the i-th source copied into the i-th hole, one token at a time, reading from the original pools."""
    out = {n: (t.clone() if t is not None else None) for n, t in case.items()}
    lead = case["lengths"].shape
    rows = case["lengths"].numel()
    P = case["k_pages"].shape[1]
    tables = case["page_table"].reshape(rows, -1).tolist()
    kept = case["kept_idx"].reshape(rows, -1).tolist()
    new_len = []
    for r in range(rows):
        a = [s for s in kept[r] if s >= 0]
        n = len(a)
        holes = [s for s in range(n) if s not in set(a)]
        sources = [s for s in a if s >= n]
        assert len(holes) == len(sources)
        for h, s in zip(holes, sources):
            sp, so, dp, do = tables[r][s // P], s % P, tables[r][h // P], h % P
            out["k_pages"][dp, do] = case["k_pages"][sp, so]
            out["v_pages"][dp, do] = case["v_pages"][sp, so]
            if case["pos_pages"] is not None:
                out["pos_pages"][dp, do] = case["pos_pages"][sp, so]
        new_len.append(n)
    out["lengths"] = torch.tensor(new_len, dtype=case["lengths"].dtype).reshape(lead)
    return out


def naive_plan(case):
    rows = case["lengths"].numel()
    kept = case["kept_idx"].reshape(rows, -1).tolist()
    src, dst, row = [], [], []
    for r in range(rows):
        a = [s for s in kept[r] if s >= 0]
        holes = [s for s in range(len(a)) if s not in set(a)]
        sources = [s for s in a if s >= len(a)]
        src += sources
        dst += holes
        row += [r] * len(holes)
    return src, dst, row


def assert_same(got, want, what=""):
    for n in ("k_pages", "v_pages", "pos_pages", "lengths"):
        if want[n] is None:
            assert got[n] is None
            continue
        g, w = got[n].cpu(), want[n].cpu()
        if not torch.equal(g.view(torch.uint8) if g.is_floating_point() else g,
                           w.view(torch.uint8) if w.is_floating_point() else w):
            bad = (g != w).reshape(g.shape[0], -1).any(1).nonzero().flatten().tolist()
            raise AssertionError(f"{what}: {n} differs in {len(bad)} page(s)/row(s), e.g. {bad[:8]}")


def run(case, backend):
    out = clone_case(case)
    compact_(out["k_pages"], out["v_pages"], out["page_table"], out["lengths"], out["kept_idx"],
             pos_pages=out["pos_pages"], backend=backend)
    return out


# --------------------------------------------------------------------------- reference vs naive
@pytest.mark.parametrize("page_size", [1, 4, 16, 17])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_matches_naive(page_size, seed):
    case = make_case(lead=(3, 4), page_size=page_size, max_len=37, seed=seed)
    src, dst, row = compaction_plan_ref(case["kept_idx"], case["lengths"])
    n_src, n_dst, n_row = naive_plan(case)
    assert src.tolist() == n_src and dst.tolist() == n_dst and row.tolist() == n_row
    assert len(n_src) > 0  # the case does move something
    # Minimal and race-free: every move reads a slot >= the new length and writes one below it.
    new_len = (case["kept_idx"] >= 0).sum(-1).reshape(-1)
    assert bool((src >= new_len[row]).all()) and bool((dst < new_len[row]).all())


@pytest.mark.parametrize("page_size", [1, 16, 17])
@pytest.mark.parametrize("lead", [(2, 3), (2, 2, 3)])
def test_reference_matches_naive(page_size, lead):
    case = make_case(lead=lead, page_size=page_size, max_len=41, seed=page_size)
    assert_same(run(case, "reference"), naive_compact(case), "reference vs naive")


def test_reference_keeps_exactly_the_kept_tokens():
    """Property of the contract, not of the plan: afterwards each row holds exactly its kept tokens
    (same K/V bits, same positions), kept slots below the new length did not move, and no page
    outside the rows' pages changed."""
    case = make_case(lead=(4, 3), page_size=5, max_len=30, seed=3)
    out = run(case, "reference")
    P = case["k_pages"].shape[1]
    tables = case["page_table"].reshape(12, -1)
    for r in range(12):
        a = [s for s in case["kept_idx"].reshape(12, -1)[r].tolist() if s >= 0]
        n = len(a)
        assert int(out["lengths"].reshape(-1)[r]) == n
        before = {int(case["pos_pages"][tables[r][s // P], s % P]): case["k_pages"][tables[r][s // P], s % P]
                  for s in a}
        after = {int(out["pos_pages"][tables[r][s // P], s % P]): out["k_pages"][tables[r][s // P], s % P]
                 for s in range(n)}
        assert before.keys() == after.keys()
        assert all(torch.equal(before[p], after[p]) for p in before)
        for s in a:
            if s < n:
                assert torch.equal(out["v_pages"][tables[r][s // P], s % P], case["v_pages"][tables[r][s // P], s % P])
    used = set(tables.flatten().tolist())
    spare = [p for p in range(case["k_pages"].shape[0]) if p not in used]
    assert torch.equal(out["k_pages"][spare], case["k_pages"][spare])


def test_nothing_evicted_is_a_no_op():
    case = make_case(lead=(2, 3), modes=("all",), seed=4)
    out = run(case, "reference")
    assert_same(out, case, "keep-all")


# --------------------------------------------------------------------------- Triton vs reference
@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("page_size", [1, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(device, page_size, dtype):
    # bf16 is fine in the interpreter here: the kernel moves raw bits as integers, no arithmetic.
    case = make_case(lead=(2, 3), page_size=page_size, dtype=dtype, max_len=37, seed=page_size, device=device)
    ref = run(case, "reference")
    assert_same(ref, naive_compact({n: (t.cpu() if t is not None else None) for n, t in case.items()}), "ref")
    assert_same(run(case, "triton"), ref, "triton vs reference")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("kw", [
    dict(lead=(2, 2, 3), page_size=4),                                    # [L, B, H] rows
    dict(lead=(3, 2), page_size=16, pool="slice_d", head_dim=6),          # odd D: no wide view
    dict(lead=(3, 2), page_size=7, pool="strided_pages", dtype=torch.float32),
    dict(lead=(2, 3), page_size=4, idx_dtype=torch.int32, with_pos=False),
    dict(lead=(2, 2), page_size=16, K=0, modes=("none",)),                # K = 0: every row emptied
    dict(lead=(2, 2), page_size=3, modes=("none",), k_extra=4),           # all -1 padding
    dict(lead=(2, 2), page_size=8, modes=("random", "tail"), head_dim=256, dtype=torch.float32,
         max_len=111),                                                    # several kept_idx tiles per row
    dict(lead=(1,), page_size=16, modes=("one",), max_len=97),
])
def test_triton_matches_reference_layouts(device, kw):
    case = make_case(device=device, seed=7, **kw)
    ref = run(case, "reference")
    assert_same(ref, naive_compact({n: (t.cpu() if t is not None else None) for n, t in case.items()}), "ref")
    got = run(case, "triton")
    assert_same(got, ref, f"triton vs reference {kw}")
    # The non-contiguous layouts are still the same views (the op wrote through them).
    assert got["k_pages"].stride() == case["k_pages"].stride()


# --------------------------------------------------------------------------- registration
def test_opcheck():
    case = make_case(lead=(2, 2), page_size=4, seed=9)
    args = (case["k_pages"], case["v_pages"], case["page_table"], case["lengths"], case["kept_idx"],
            case["pos_pages"], "reference")
    torch.library.opcheck(torch.ops.kvpress_kernels.compact_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    """torch.compile sees one opaque mutating op: no graph break (fullgraph), results unchanged.
    aot_eager exercises tracing and functionalization without paying for inductor codegen."""
    case = make_case(lead=(2, 3), page_size=4, seed=12)
    c = clone_case(case)

    def f(k, v, t, lengths, kept, pos):
        compact_(k, v, t, lengths, kept, pos_pages=pos, backend="reference")

    torch.compile(f, fullgraph=True, backend="aot_eager")(
        c["k_pages"], c["v_pages"], c["page_table"], c["lengths"], c["kept_idx"], c["pos_pages"])
    assert_same(c, naive_compact(case), "compiled")


# --------------------------------------------------------------------------- bad inputs
def _call(case, **over):
    c = clone_case(case)
    c.update(over)
    compact_(c["k_pages"], c["v_pages"], c["page_table"], c["lengths"], c["kept_idx"], pos_pages=c["pos_pages"],
             backend=c.get("backend"))


@pytest.fixture
def case():
    return make_case(lead=(2, 3), page_size=4, seed=10, max_len=12)


def test_bad_ranks_shapes_dtypes(case):
    assert_rejects_bad_paged_layout(_call, case, int_dtype=torch.int16)
    k = case["k_pages"]
    with pytest.raises(ValueError, match="v_pages"):
        _call(case, v_pages=case["v_pages"][:, :, :-1])
    with pytest.raises(ValueError, match="k_pages"):
        _call(case, k_pages=k.transpose(1, 2).contiguous().transpose(1, 2))  # last stride != 1
    with pytest.raises(TypeError, match="kept_idx"):
        _call(case, kept_idx=case["kept_idx"].float())
    with pytest.raises(ValueError, match="kept_idx"):
        _call(case, kept_idx=case["kept_idx"][0])
    with pytest.raises(ValueError, match="kept_idx"):
        _call(case, kept_idx=case["kept_idx"][:1])
    with pytest.raises(ValueError, match="pos_pages"):
        _call(case, pos_pages=case["pos_pages"][:-1])
    with pytest.raises(TypeError, match="pos_pages"):
        _call(case, pos_pages=case["pos_pages"].float())
    with pytest.raises(ValueError, match="page_table"):
        _call(case, page_table=case["page_table"].to("meta"))


def test_bad_kept_values(case):
    kept = case["kept_idx"]
    lengths = case["lengths"]
    row_full = kept.clone()
    row_full[0, 0, :3] = torch.tensor([0, 2, 1])          # not ascending
    with pytest.raises(ValueError, match="kept_idx.*ascending"):
        _call(case, kept_idx=row_full)
    dup = kept.clone()
    dup[0, 0, :2] = torch.tensor([3, 3])
    dup[0, 0, 2:] = -1
    with pytest.raises(ValueError, match="kept_idx.*ascending"):
        _call(case, kept_idx=dup)
    beyond = kept.clone()
    beyond[0, 0, 0] = int(lengths[0, 0])
    beyond[0, 0, 1:] = -1
    with pytest.raises(ValueError, match="kept_idx.*lengths"):
        _call(case, kept_idx=beyond)
    neg = kept.clone()
    neg[0, 0, -1] = -2
    with pytest.raises(ValueError, match="kept_idx.*-1"):
        _call(case, kept_idx=neg)
    gap = torch.full_like(kept, -1)
    gap[0, 0, 1] = 0
    with pytest.raises(ValueError, match="kept_idx.*-1"):
        _call(case, kept_idx=gap)


def test_bad_page_table_values(case):
    table = case["page_table"].clone()
    table[0, 0, 0] = case["k_pages"].shape[0]
    with pytest.raises(ValueError, match="page_table"):
        _call(case, page_table=table)
    shared = case["page_table"].clone()
    shared[0, 1, 0] = shared[0, 0, 0]
    lengths = case["lengths"].clone()
    lengths[0, 1] = 5  # row (0, 1) keeps nothing, so any length is consistent with kept_idx
    assert int(case["lengths"][0, 1]) == 0 and int(lengths[0, 0]) > 0
    _call(case, page_table=shared)  # the shared page holds no token of row (0, 1) yet: accepted
    with pytest.raises(ValueError, match="page_table.*one row"):
        _call(case, page_table=shared, lengths=lengths)
    too_long = case["lengths"].clone()
    too_long[0, 0] = case["page_table"].shape[-1] * 4 + 1
    with pytest.raises(ValueError, match="lengths"):
        _call(case, lengths=too_long)


def test_bad_input_leaves_cache_untouched(case):
    """Checks run before any move: a rejected call must not have mutated anything."""
    c = clone_case(case)
    bad = c["kept_idx"].clone()
    bad[1, 2, 0] = 99
    bad[1, 2, 1:] = -1
    with pytest.raises(ValueError):
        compact_(c["k_pages"], c["v_pages"], c["page_table"], c["lengths"], bad, pos_pages=c["pos_pages"])
    assert_same(c, case, "after a rejected call")


def test_cuda_backend_needs_cuda_tensors(case):
    with pytest.raises(ValueError, match="backend='cuda'"):
        _call(case, backend="cuda")


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_backends_match_reference(dtype):
    case = make_case(lead=(3, 2, 4), page_size=16, head_dim=128, dtype=dtype, max_len=300, seed=11, device="cuda")
    ref = run({n: (t.cpu() if t is not None else None) for n, t in case.items()}, "reference")
    assert_same(run(case, "triton"), ref, "triton (GPU) vs reference")
    if cuda_ext_status()[0] is not None:
        assert_same(run(case, "cuda"), ref, "cuda vs reference")
    else:
        with pytest.raises(ValueError, match="backend='cuda'"):
            run(case, "cuda")
    assert HAS_CUDA
