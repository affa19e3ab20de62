"""Append (kvpress_kernels.ops.append): reference vs a naive per-token Python loop, Triton vs the
reference, exactly (data movement: torch.equal on whole pools, lengths and positions)."""

import math

import pytest
import torch
from _fixtures import assert_rejects_bad_paged_layout
from conftest import devices_for_triton

from kvpress_kernels.ops.append import append_


def make_case(lead=(2, 3), page_size=4, head_dim=8, T=7, dtype=torch.float16, max_pages=None, seed=0,
              with_counts=True, with_pos=True, idx_dtype=torch.int32, device="cpu", layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    rows = math.prod(lead)
    max_pages = max_pages or -(-(T + 20) // page_size)
    cap = max_pages * page_size
    num_pages = rows * max_pages + 2
    table = torch.randperm(num_pages, generator=g)[: rows * max_pages].reshape(*lead, max_pages).to(idx_dtype)
    if layout == "strided_table":  # every other column of a wider table (last stride 2)
        wide = torch.full((*lead, 2 * max_pages), -7, dtype=idx_dtype)
        wide[..., ::2] = table
        table = wide[..., ::2]
    lengths = torch.randint(0, cap - T + 1, (rows,), generator=g).to(idx_dtype).reshape(lead)
    k = torch.randn((num_pages, page_size, head_dim), generator=g).to(dtype)
    v = torch.randn((num_pages, page_size, head_dim), generator=g).to(dtype)
    if layout == "transposed_new":  # k_new as a [.., T, H, D] tensor viewed as [.., H, T, D]
        k_new = torch.randn((*lead[:-1], T, lead[-1], head_dim), generator=g).to(dtype).transpose(-3, -2)
        v_new = torch.randn((*lead[:-1], T, lead[-1], head_dim), generator=g).to(dtype).transpose(-3, -2)
    else:
        k_new = torch.randn((*lead, T, head_dim), generator=g).to(dtype)
        v_new = torch.randn((*lead, T, head_dim), generator=g).to(dtype)
    if layout == "slice_d":
        k = torch.randn((num_pages, page_size, head_dim + 3), generator=g).to(dtype)[..., 2: 2 + head_dim]
    counts = None
    if with_counts:
        counts = torch.randint(0, T + 1, (rows,), generator=g).to(idx_dtype).reshape(lead)
        counts.view(-1)[0] = T
        if rows > 1:
            counts.view(-1)[1] = 0
    pos_pages = torch.full((num_pages, page_size), -5, dtype=torch.int32) if with_pos else None
    pos_new = torch.randint(0, 1 << 20, (*lead, T), generator=g) if with_pos else None
    case = dict(k_pages=k, v_pages=v, page_table=table, lengths=lengths, k_new=k_new, v_new=v_new,
                counts=counts, pos_pages=pos_pages, pos_new=pos_new)
    return {n: (t.to(device) if t is not None else None) for n, t in case.items()}


def clone_case(case):
    out = {}
    for n, t in case.items():
        if t is None or t.is_contiguous():
            out[n] = t.clone() if t is not None else None
        else:
            out[n] = t._base.clone().as_strided(t.shape, t.stride(), t.storage_offset())
    return out


def naive_append(case):
    out = {n: (t.clone() if t is not None else None) for n, t in case.items()}
    lead = case["lengths"].shape
    rows = case["lengths"].numel()
    P = case["k_pages"].shape[1]
    T = case["k_new"].shape[-2]
    table = case["page_table"].reshape(rows, -1).tolist()
    lens = case["lengths"].reshape(rows).tolist()
    cnt = case["counts"].reshape(rows).tolist() if case["counts"] is not None else [T] * rows
    kn = case["k_new"].reshape(rows, T, -1)
    vn = case["v_new"].reshape(rows, T, -1)
    for r in range(rows):
        for t in range(cnt[r]):
            s = lens[r] + t
            page, off = table[r][s // P], s % P
            out["k_pages"][page, off] = kn[r, t]
            out["v_pages"][page, off] = vn[r, t]
            if case["pos_pages"] is not None:
                out["pos_pages"][page, off] = int(case["pos_new"].reshape(rows, T)[r, t])
    out["lengths"] = torch.tensor([lens[r] + cnt[r] for r in range(rows)], dtype=case["lengths"].dtype).reshape(lead)
    return out


def run(case, backend):
    c = clone_case(case)
    append_(c["k_pages"], c["v_pages"], c["page_table"], c["lengths"], c["k_new"], c["v_new"], counts=c["counts"],
            pos_pages=c["pos_pages"], pos_new=c["pos_new"], backend=backend)
    return c


def assert_same(got, want, what):
    for n in ("k_pages", "v_pages", "pos_pages", "lengths"):
        if want[n] is None:
            assert got[n] is None
            continue
        g, w = got[n].cpu(), want[n].cpu()
        if g.is_floating_point():
            g, w = g.view(torch.uint8), w.view(torch.uint8)   # bit equality, NaN-safe
        if not torch.equal(g, w):
            bad = (g != w).reshape(g.shape[0], -1).any(1).nonzero().flatten().tolist()
            raise AssertionError(f"{what}: {n} differs in {len(bad)} page(s)/row(s), e.g. {bad[:8]}")


def cpu(case):
    return {n: (t.cpu() if t is not None else None) for n, t in case.items()}


@pytest.mark.parametrize("page_size", [1, 16, 17])
@pytest.mark.parametrize("T", [1, 7, 17])
def test_reference_matches_naive(page_size, T):
    case = make_case(page_size=page_size, T=T, seed=page_size * 31 + T)
    assert_same(run(case, "reference"), naive_append(case), "reference vs naive")


@pytest.mark.parametrize("kw", [
    dict(with_counts=False, with_pos=False),
    dict(idx_dtype=torch.int64, lead=(2, 2, 3)),
    dict(layout="transposed_new"),
    dict(layout="strided_table"),
    dict(layout="slice_d", dtype=torch.float32),
])
def test_reference_matches_naive_layouts(kw):
    case = make_case(seed=5, **kw)
    assert_same(run(case, "reference"), naive_append(case), f"reference vs naive {kw}")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("page_size", [1, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(device, page_size, dtype):
    # bf16 is fine in the interpreter: the kernel moves raw bits as integers, no arithmetic.
    case = make_case(page_size=page_size, dtype=dtype, T=7, seed=page_size, device=device)
    ref = run(case, "reference")
    assert_same(ref, naive_append(cpu(case)), "reference vs naive")
    assert_same(run(case, "triton"), ref, "triton vs reference")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("kw", [
    dict(with_counts=False, with_pos=False, T=17),
    dict(idx_dtype=torch.int64, lead=(2, 2, 3), T=3),
    dict(layout="transposed_new", head_dim=6),
    dict(layout="strided_table", page_size=3),
    dict(layout="slice_d", dtype=torch.float32, head_dim=5),
    dict(lead=(1,), T=1, page_size=1, head_dim=1),
])
def test_triton_matches_reference_layouts(device, kw):
    case = make_case(seed=6, device=device, **kw)
    ref = run(case, "reference")
    assert_same(ref, naive_append(cpu(case)), "reference vs naive")
    assert_same(run(case, "triton"), ref, f"triton vs reference {kw}")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_more_tokens_than_grid_axis(device, monkeypatch):
    # CUDA caps grid axis 1 at 65,535, so the kernel strides over tokens when T is larger. Shrink the
    # cap to 3 here so the striding loop (several tokens per program, ragged counts) is exercised.
    import kvpress_kernels.ops.append as append_mod

    monkeypatch.setattr(append_mod, "_MAX_GRID_Y", 3)
    case = make_case(page_size=5, dtype=torch.float32, T=17, seed=3, device=device)
    ref = run(case, "reference")
    assert_same(run(case, "triton"), ref, "triton (strided tokens) vs reference")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_empty_append(device):
    case = make_case(T=0, device=device, with_counts=False)
    assert_same(run(case, "triton"), case, "T = 0 changes nothing")
    case = make_case(T=3, device=device, with_counts=True)
    case["counts"].zero_()
    assert_same(run(case, "triton"), case, "counts = 0 changes nothing")


def test_opcheck():
    case = make_case(seed=9)
    args = tuple(case[n] for n in ("k_pages", "v_pages", "page_table", "lengths", "k_new", "v_new", "counts",
                                   "pos_pages", "pos_new")) + ("reference",)
    torch.library.opcheck(torch.ops.kvpress_kernels.append_.default, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- bad inputs
def _call(case, **over):
    c = clone_case(case)
    c.update(over)
    append_(c["k_pages"], c["v_pages"], c["page_table"], c["lengths"], c["k_new"], c["v_new"], counts=c["counts"],
            pos_pages=c["pos_pages"], pos_new=c["pos_new"], backend=c.get("backend"))


@pytest.fixture
def case():
    return make_case(seed=10)


def test_bad_shapes_and_dtypes(case):
    assert_rejects_bad_paged_layout(_call, case)
    with pytest.raises(ValueError, match="v_pages"):
        _call(case, v_pages=case["v_pages"][:-1])
    with pytest.raises(TypeError, match="k_new"):
        _call(case, k_new=case["k_new"].float())
    with pytest.raises(ValueError, match="k_new"):
        _call(case, k_new=case["k_new"][..., :-1])
    with pytest.raises(ValueError, match="k_new"):
        _call(case, k_new=case["k_new"][0])
    with pytest.raises(ValueError, match="v_new"):
        _call(case, v_new=case["v_new"][:, :, :-1])
    with pytest.raises(ValueError, match="counts"):
        _call(case, counts=case["counts"][:1])
    with pytest.raises(ValueError, match="pos_pages and pos_new"):
        _call(case, pos_new=None)
    with pytest.raises(ValueError, match="pos_pages"):
        _call(case, pos_pages=case["pos_pages"][:, :-1])
    with pytest.raises(ValueError, match="pos_new"):
        _call(case, pos_new=case["pos_new"][..., :-1])
    with pytest.raises(ValueError, match="k_new"):
        _call(case, k_new=case["k_new"].to("meta"))


def test_bad_values(case):
    over = case["counts"].clone()
    over.view(-1)[2] = case["k_new"].shape[-2] + 1
    with pytest.raises(ValueError, match="counts"):
        _call(case, counts=over)
    full = case["lengths"].clone()
    full.view(-1)[0] = case["page_table"].shape[-1] * case["k_pages"].shape[1] - 1  # counts[0] = T > 1 room
    with pytest.raises(ValueError, match="lengths \\+ counts"):
        _call(case, lengths=full)
    table = case["page_table"].clone()
    table[0, 0, :] = case["k_pages"].shape[0]
    with pytest.raises(ValueError, match="page_table"):
        _call(case, page_table=table)
