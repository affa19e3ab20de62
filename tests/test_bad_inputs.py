"""A sweep of malformed inputs over the whole public API (issue 7, DESIGN.md §4).

Every public op, ``PagedKVCache``, the methods, the shot helpers, both integrations' argument checks
and the CLI get, for every argument, the malformed values a user could pass: not a tensor, wrong
rank, dtype, device (a ``meta`` tensor is a wrong device on a CPU machine), shape, a non-unit last
stride, negative or oversized budgets, impossible budgets, page tables pointing outside the pool,
lengths beyond capacity, unsorted / duplicated / out-of-range kept slots, overlapping or
out-of-range spans and shots, keep ratios outside ``(0, 1]``, mismatched layer counts.

Each must raise ``TypeError``/``ValueError`` whose message names the argument, and a rejected call to
a mutating op or to the cache must leave every buffer bit for bit as it was (no silent corruption).
Inputs that are legal but degenerate have a documented, tested behaviour instead of an error:

- NaN scores rank below every number (``-inf`` included), NaNs among themselves by position, on
  every backend; NaN propagates through segment reductions;
- an empty batch (``B = 0``) returns empty outputs of the documented shapes and mutates nothing;
- zero-length rows are no-ops: decoding over them gives zeros (not NaN) and zero probabilities,
  selection keeps nothing (``-1`` padding), ``T = 0`` / ``counts = 0`` appends write nothing,
  ``K = 0`` compaction empties rows;
- page-table entries past a row's used pages are never read (they may hold anything), and dead
  slots of a page (freed tokens, NaN or inf) never leak into attention.

Ops run on both backends available here (reference, and Triton in the interpreter): the checks sit
before dispatch, so both must answer the same way.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import _fixtures
from conftest import devices_for_triton

import kvpress_kernels as kk
from kvpress_kernels import cli
from kvpress_kernels.cache import CacheFullError, PagedKVCache
from kvpress_kernels.integrations.transformers import ATTN_IMPLEMENTATION, PagedCache
from kvpress_kernels.ops import (append_, attention_lse, attention_mass, attention_mass_paged, compact_,
                                 paged_decode_attention, pool_scores, segment_reduce, segments_to_token_mask,
                                 select_segments, select_topk, token_norm)
from kvpress_kernels.shots import normalize_batch_shots, validate_spans

NAN, INF = float("nan"), float("inf")
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


# ------------------------------------------------------------------------------------------------
# Valid inputs of every op (small; each bad case changes one argument)
# ------------------------------------------------------------------------------------------------

def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _pools(P=8, ps=4, D=8):
    g = _g()
    return torch.randn(P, ps, D, generator=g), torch.randn(P, ps, D, generator=g)


def _table():  # [B=2, Hkv=2, max_pages=2]: rows own pages (0,1) (2,3) (4,5) (6,7)
    return torch.arange(8, dtype=torch.int32).view(2, 2, 2)


def valid(op: str) -> dict:
    g = _g(1)
    if op == "append_":
        kp, vp = _pools()
        return dict(k_pages=kp, v_pages=vp, page_table=_table(),
                    lengths=torch.tensor([[1, 3], [0, 2]], dtype=torch.int32),
                    k_new=torch.randn(2, 2, 3, 8, generator=g), v_new=torch.randn(2, 2, 3, 8, generator=g),
                    counts=torch.tensor([[3, 2], [0, 3]], dtype=torch.int32),
                    pos_pages=torch.zeros(8, 4, dtype=torch.int32),
                    pos_new=torch.arange(12, dtype=torch.int32).view(2, 2, 3))
    if op == "compact_":
        kp, vp = _pools()
        kept = torch.tensor([[[0, 2, 4], [1, -1, -1]], [[-1, -1, -1], [0, 6, 7]]], dtype=torch.int32)
        return dict(k_pages=kp, v_pages=vp, page_table=_table(),
                    lengths=torch.tensor([[5, 3], [0, 8]], dtype=torch.int32),
                    kept_idx=kept, pos_pages=torch.arange(32, dtype=torch.int32).view(8, 4))
    if op == "paged_decode_attention":
        kp, vp = _pools()
        return dict(q=torch.randn(2, 4, 1, 8, generator=g), k_pages=kp, v_pages=vp, page_table=_table(),
                    lengths=torch.tensor([[5, 3], [0, 8]], dtype=torch.int32), scale=0.3, causal=True,
                    return_probs=True, num_splits=2)
    if op == "attention_mass":
        return dict(q=torch.randn(2, 4, 3, 8, generator=g), k=torch.randn(2, 2, 10, 8, generator=g),
                    lengths=torch.tensor([10, 6]), scale=0.3, lse=None, causal=True, head_reduce="group_sum",
                    pool="avg", pool_size=3, pool_end=7)
    if op == "attention_lse":
        return dict(q=torch.randn(2, 4, 3, 8, generator=g), k=torch.randn(2, 2, 10, 8, generator=g),
                    lengths=torch.tensor([10, 6]), scale=0.3, causal=True)
    if op == "attention_mass_paged":
        kp, _ = _pools()
        return dict(q=torch.randn(2, 4, 3, 8, generator=g), k_pages=kp, page_table=_table(),
                    lengths=torch.tensor([[5, 3], [3, 8]], dtype=torch.int32), max_len=8, scale=0.3,
                    head_reduce="group_max", pool="max", pool_size=3, pool_end=6)
    if op == "pool_scores":
        return dict(scores=torch.randn(2, 3, 10, generator=g), pool="avg", pool_size=3,
                    lengths=torch.tensor([10, 4]), pool_end=8)
    if op == "token_norm":
        return dict(x=torch.randn(2, 2, 10, 8, generator=g), lengths=torch.tensor([10, 4]))
    if op == "segment_reduce":
        return dict(scores=torch.randn(3, 10, generator=g), spans=torch.tensor([[0, 2], [2, 5], [7, 10]]),
                    reduce="max", lengths=torch.tensor([10, 4, 0]))
    if op == "segments_to_token_mask":
        return dict(seg_keep=torch.tensor([[True, False, True]] * 3), n_tokens=10,
                    spans=torch.tensor([[0, 2], [2, 5], [7, 10]]))
    if op == "select_topk":
        protect = torch.zeros(3, 10, dtype=torch.bool)
        protect[0, 5] = True
        return dict(scores=torch.randn(3, 10, generator=g), budget=4, lengths=torch.tensor([10, 6, 4]), sink=1,
                    recent=1, protect=protect)
    if op == "select_segments":
        return dict(seg_scores=torch.randn(3, 4, generator=g), seg_sizes=torch.tensor([2, 3, 1, 4]), budget=6,
                    policy="skip", protect=torch.tensor([[True, False, False, False]] * 3))
    raise AssertionError(op)


OPS = {"append_": append_, "compact_": compact_, "paged_decode_attention": paged_decode_attention,
       "attention_mass": attention_mass, "attention_lse": attention_lse, "attention_mass_paged": attention_mass_paged,
       "pool_scores": pool_scores, "token_norm": token_norm, "segment_reduce": segment_reduce,
       "segments_to_token_mask": segments_to_token_mask, "select_topk": select_topk, "select_segments": select_segments}
NO_BACKEND = {"pool_scores", "token_norm", "segments_to_token_mask"}  # plain PyTorch, no backend keyword
MUTATING = {"append_", "compact_"}

# Tensor arguments of each op: (name, kind) with kind "float" / "int" / "bool"; the first one sets the
# device the others must share.
TENSOR_ARGS = {
    "append_": [("k_pages", "float"), ("v_pages", "float"), ("page_table", "int"), ("lengths", "int"),
                ("k_new", "float"), ("v_new", "float"), ("counts", "int"), ("pos_pages", "int"), ("pos_new", "int")],
    "compact_": [("k_pages", "float"), ("v_pages", "float"), ("page_table", "int"), ("lengths", "int"),
                 ("kept_idx", "int"), ("pos_pages", "int")],
    "paged_decode_attention": [("q", "float"), ("k_pages", "float"), ("v_pages", "float"), ("page_table", "int"),
                               ("lengths", "int")],
    "attention_mass": [("q", "float"), ("k", "float"), ("lengths", "int")],
    "attention_lse": [("q", "float"), ("k", "float"), ("lengths", "int")],
    "attention_mass_paged": [("q", "float"), ("k_pages", "float"), ("page_table", "int"), ("lengths", "int")],
    "pool_scores": [("scores", "float"), ("lengths", "int")],
    "token_norm": [("x", "float"), ("lengths", "int")],
    "segment_reduce": [("scores", "float"), ("spans", "int"), ("lengths", "int")],
    "segments_to_token_mask": [("seg_keep", "bool"), ("spans", "int")],
    "select_topk": [("scores", "float"), ("lengths", "int"), ("protect", "bool")],
    "select_segments": [("seg_scores", "float"), ("seg_sizes", "int"), ("protect", "bool")],
}
# Arguments whose last dimension must be contiguous (kernels read rows with unit stride).
UNIT_STRIDE = {("append_", "k_pages"), ("append_", "v_pages"), ("append_", "k_new"), ("append_", "v_new"),
               ("compact_", "k_pages"), ("compact_", "v_pages"),
               ("paged_decode_attention", "q"), ("paged_decode_attention", "k_pages"),
               ("paged_decode_attention", "v_pages"), ("attention_mass", "q"), ("attention_mass", "k"),
               ("attention_lse", "q"), ("attention_lse", "k"), ("attention_mass_paged", "q"),
               ("attention_mass_paged", "k_pages")}


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, last-dimension stride 2."""
    return torch.stack([t, t], -1)[..., 0]


def wrong_dtype(t: torch.Tensor, kind: str) -> torch.Tensor:
    return {"float": lambda: t.to(torch.int32), "int": lambda: t.float(), "bool": lambda: t.float()}[kind]()


def generic_cases():
    """Not a tensor, wrong dtype, wrong device, non-unit last stride: for every tensor argument."""
    out = []
    for op, args in TENSOR_ARGS.items():
        first = args[0][0]
        for name, kind in args:
            word = rf"\b{name}\b"
            out.append(pytest.param(op, name, lambda kw, n=name: kw[n].tolist(), TypeError, word,
                                    id=f"{op}-{name}-not_a_tensor"))
            out.append(pytest.param(op, name, lambda kw, n=name, k=kind: wrong_dtype(kw[n], k), TypeError, word,
                                    id=f"{op}-{name}-dtype"))
            # A first argument on another device is reported by the first argument that disagrees with it.
            names = name if name != first else f"{name}|{args[1][0]}"
            out.append(pytest.param(op, name, lambda kw, n=name: kw[n].to("meta"), ValueError,
                                    rf"\b({names})\b.*device", id=f"{op}-{name}-device"))
            if (op, name) in UNIT_STRIDE:
                out.append(pytest.param(op, name, lambda kw, n=name: strided(kw[n]), ValueError, word,
                                        id=f"{op}-{name}-stride"))
    return out


def C(op, arg, bad, exc=ValueError, match=None, label=""):
    """An explicit case: ``bad(kw)`` is the malformed value of ``arg`` (``arg=None``: ``bad`` edits kw)."""
    return pytest.param(op, arg, bad, exc, match or rf"\b{arg}\b", id=f"{op}-{arg}-{label}")


def _set(kw, **over):
    kw.update(over)


LEN_OVER = torch.tensor([[5, 9], [0, 8]], dtype=torch.int32)   # 9 > 2 pages * 4 slots
OUT_OF_POOL = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 99]]], dtype=torch.int32)
NEGATIVE_PAGE = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [-1, 7]]], dtype=torch.int32)

EXPLICIT = [
    # ---- append_
    C("append_", "k_pages", lambda kw: kw["k_pages"][0], label="rank"),
    C("append_", "v_pages", lambda kw: kw["v_pages"][:, :2], label="shape"),
    C("append_", "v_pages", lambda kw: kw["v_pages"].half(), TypeError, label="dtype_mismatch"),
    C("append_", "page_table", lambda kw: torch.tensor(3, dtype=torch.int32), label="rank0"),
    C("append_", "page_table", lambda kw: OUT_OF_POOL, label="outside_pool"),
    C("append_", "page_table", lambda kw: NEGATIVE_PAGE, label="negative_page"),
    C("append_", "lengths", lambda kw: kw["lengths"][:1], label="shape"),
    C("append_", "lengths", lambda kw: torch.tensor([[1, -3], [0, 2]], dtype=torch.int32), label="negative"),
    C("append_", "lengths", lambda kw: torch.tensor([[1, 7], [0, 2]], dtype=torch.int32), label="beyond_capacity"),
    C("append_", "lengths", lambda kw: torch.tensor([[1, 0, 3, 0], [0, 0, 2, 0]], dtype=torch.int32)[:, ::2],
      label="noncontiguous"),
    C("append_", "k_new", lambda kw: kw["k_new"][0], label="rank"),
    C("append_", "k_new", lambda kw: kw["k_new"][..., :4], label="head_dim"),
    C("append_", "k_new", lambda kw: kw["k_new"].half(), TypeError, label="dtype_mismatch"),
    C("append_", "v_new", lambda kw: kw["v_new"][:, :, :2], label="T_mismatch"),
    C("append_", "counts", lambda kw: kw["counts"][0], label="shape"),
    C("append_", "counts", lambda kw: torch.tensor([[4, 2], [0, 3]], dtype=torch.int32), label="above_T"),
    C("append_", "counts", lambda kw: torch.tensor([[-1, 2], [0, 3]], dtype=torch.int32), label="negative"),
    C("append_", "pos_new", lambda kw: None, match="pos_pages and pos_new", label="missing"),
    C("append_", "pos_new", lambda kw: kw["pos_new"][..., :2], label="shape"),
    C("append_", "pos_pages", lambda kw: kw["pos_pages"][:, :3], label="shape"),
    C("append_", "backend", lambda kw: "numba", label="unknown"),
    # ---- compact_
    C("compact_", "k_pages", lambda kw: kw["k_pages"][None], label="rank"),
    C("compact_", "v_pages", lambda kw: kw["v_pages"][:4], label="shape"),
    C("compact_", "page_table", lambda kw: OUT_OF_POOL, label="outside_pool"),
    C("compact_", "page_table", lambda kw: torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 0]]], dtype=torch.int32),
      label="page_owned_twice"),
    C("compact_", "lengths", lambda kw: LEN_OVER, label="beyond_capacity"),
    C("compact_", "lengths", lambda kw: torch.tensor([[5, 3], [-1, 8]], dtype=torch.int32), label="negative"),
    C("compact_", "lengths", lambda kw: kw["lengths"].t().contiguous().t(), label="noncontiguous"),
    C("compact_", "kept_idx", lambda kw: kw["kept_idx"][0], label="rank"),
    C("compact_", "kept_idx", lambda kw: kw["kept_idx"][:1], label="rows"),
    C("compact_", "kept_idx", lambda kw: torch.tensor([[[2, 0, 4], [1, -1, -1]], [[-1, -1, -1], [0, 6, 7]]],
                                                      dtype=torch.int32), label="unsorted"),
    C("compact_", "kept_idx", lambda kw: torch.tensor([[[0, 2, 2], [1, -1, -1]], [[-1, -1, -1], [0, 6, 7]]],
                                                      dtype=torch.int32), label="duplicate"),
    C("compact_", "kept_idx", lambda kw: torch.tensor([[[0, 2, 5], [1, -1, -1]], [[-1, -1, -1], [0, 6, 7]]],
                                                      dtype=torch.int32), label="beyond_length"),
    C("compact_", "kept_idx", lambda kw: torch.tensor([[[0, 2, 4], [1, -2, -1]], [[-1, -1, -1], [0, 6, 7]]],
                                                      dtype=torch.int32), label="bad_padding"),
    C("compact_", "kept_idx", lambda kw: torch.tensor([[[0, -1, 4], [1, -1, -1]], [[-1, -1, -1], [0, 6, 7]]],
                                                      dtype=torch.int32), label="padding_inside"),
    C("compact_", "pos_pages", lambda kw: kw["pos_pages"][:, :3], label="shape"),
    C("compact_", "backend", lambda kw: "cudnn", label="unknown"),
    # ---- paged_decode_attention
    C("paged_decode_attention", "q", lambda kw: kw["q"][0], label="rank"),
    C("paged_decode_attention", "q", lambda kw: kw["q"][:, :3], match="query heads", label="gqa"),
    C("paged_decode_attention", "q", lambda kw: kw["q"][..., :0], match="head_dim", label="head_dim0"),
    C("paged_decode_attention", "k_pages", lambda kw: kw["k_pages"][..., :4], label="head_dim"),
    C("paged_decode_attention", "v_pages", lambda kw: kw["v_pages"][:4], label="shape"),
    C("paged_decode_attention", "page_table", lambda kw: kw["page_table"][:1], label="batch"),
    C("paged_decode_attention", "page_table", lambda kw: OUT_OF_POOL, label="outside_pool"),
    C("paged_decode_attention", "page_table", lambda kw: NEGATIVE_PAGE, label="negative_page"),
    C("paged_decode_attention", "lengths", lambda kw: kw["lengths"][:, :1], label="shape"),
    C("paged_decode_attention", "lengths", lambda kw: LEN_OVER, label="beyond_capacity"),
    C("paged_decode_attention", "lengths", lambda kw: -kw["lengths"], label="negative"),
    C("paged_decode_attention", "scale", lambda kw: NAN, label="nan"),
    C("paged_decode_attention", "scale", lambda kw: INF, label="inf"),
    C("paged_decode_attention", "scale", lambda kw: "0.3", TypeError, label="str"),
    C("paged_decode_attention", "causal", lambda kw: "yes", TypeError, label="str"),
    C("paged_decode_attention", "return_probs", lambda kw: 1, TypeError, label="int"),
    C("paged_decode_attention", "num_splits", lambda kw: 0, label="zero"),
    C("paged_decode_attention", "num_splits", lambda kw: 1.5, TypeError, label="float"),
    C("paged_decode_attention", "backend", lambda kw: "cuda", label="missing_backend"),
    # ---- attention_mass / attention_lse
    C("attention_mass", "q", lambda kw: kw["q"][0], label="rank"),
    C("attention_mass", "q", lambda kw: kw["q"][:, :3], match="query heads", label="gqa"),
    C("attention_mass", "q", lambda kw: torch.randn(2, 4, 11, 8), match="W=11", label="window_longer_than_keys"),
    C("attention_mass", "k", lambda kw: kw["k"][0], label="rank"),
    C("attention_mass", "k", lambda kw: kw["k"][:1], label="batch"),
    C("attention_mass", "k", lambda kw: kw["k"][..., :4].contiguous(), label="head_dim"),
    C("attention_mass", "k", lambda kw: kw["k"].half(), TypeError, label="dtype_mismatch"),
    C("attention_mass", "lengths", lambda kw: kw["lengths"][None], label="rank"),
    C("attention_mass", "lengths", lambda kw: torch.tensor([10, 2]), label="below_window"),
    C("attention_mass", "lengths", lambda kw: torch.tensor([11, 6]), label="beyond_keys"),
    C("attention_mass", "lse", lambda kw: torch.zeros(2, 4, 2), label="shape"),
    C("attention_mass", "lse", lambda kw: torch.zeros(2, 4, 3, dtype=torch.int32), TypeError, label="dtype"),
    C("attention_mass", "head_reduce", lambda kw: "avg", label="unknown"),
    C("attention_mass", "pool", lambda kw: "min", label="unknown"),
    C("attention_mass", "pool_size", lambda kw: 4, label="even"),
    C("attention_mass", "pool_size", lambda kw: 0, label="zero"),
    C("attention_mass", "pool_size", lambda kw: 3.0, TypeError, label="float"),
    C("attention_mass", "pool_end", lambda kw: 11, label="beyond_keys"),
    C("attention_mass", "pool_end", lambda kw: -1, label="negative"),
    C("attention_mass", "scale", lambda kw: NAN, label="nan"),
    C("attention_mass", "scale", lambda kw: "1", TypeError, label="str"),
    C("attention_mass", "backend", lambda kw: "cuda", label="missing_backend"),
    C("attention_lse", "q", lambda kw: kw["q"][:, :, :, None], label="rank"),
    C("attention_lse", "k", lambda kw: kw["k"][:, :0], match="kv heads", label="no_kv_heads"),
    C("attention_lse", "lengths", lambda kw: torch.tensor([10, 11]), label="beyond_keys"),
    C("attention_lse", "scale", lambda kw: -INF, label="inf"),
    # ---- attention_mass_paged
    C("attention_mass_paged", "k_pages", lambda kw: kw["k_pages"][..., :4], label="head_dim"),
    C("attention_mass_paged", "page_table", lambda kw: kw["page_table"][0], label="rank"),
    C("attention_mass_paged", "page_table", lambda kw: OUT_OF_POOL, label="outside_pool"),
    C("attention_mass_paged", "lengths", lambda kw: kw["lengths"][0], label="rank"),
    C("attention_mass_paged", "lengths", lambda kw: torch.tensor([[5, 3], [2, 8]], dtype=torch.int32),
      label="below_window"),
    C("attention_mass_paged", "max_len", lambda kw: 9, label="beyond_capacity"),
    C("attention_mass_paged", "max_len", lambda kw: -1, label="negative"),
    C("attention_mass_paged", "max_len", lambda kw: 7, match="lengths", label="below_lengths"),
    C("attention_mass_paged", "max_len", lambda kw: 8.0, TypeError, label="float"),
    C("attention_mass_paged", "pool_end", lambda kw: 9, label="beyond_max_len"),
    # ---- pool_scores / token_norm
    C("pool_scores", "scores", lambda kw: torch.tensor(1.0), label="rank0"),
    C("pool_scores", "pool", lambda kw: "median", label="unknown"),
    C("pool_scores", "pool_size", lambda kw: 2, label="even"),
    C("pool_scores", "lengths", lambda kw: torch.tensor([3]), label="shape"),
    C("pool_scores", "lengths", lambda kw: torch.tensor([3, 11]), label="beyond_N"),
    C("pool_scores", "pool_end", lambda kw: 11, label="beyond_N"),
    C("token_norm", "x", lambda kw: kw["x"][0], label="rank"),
    C("token_norm", "lengths", lambda kw: torch.tensor([1, 2, 3]), label="shape"),
    C("token_norm", "lengths", lambda kw: torch.tensor([11, 2]), label="beyond_N"),
    C("token_norm", "lengths", lambda kw: torch.tensor([-1, 2]), label="negative"),
    # ---- segment_reduce / segments_to_token_mask
    C("segment_reduce", "scores", lambda kw: kw["scores"][0], label="rank"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[0, 4], [3, 6]]), label="overlapping"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[5, 7], [0, 2]]), label="unsorted"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[0, 4], [5, 11]]), label="beyond_N"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[-1, 4]]), label="negative"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[4, 2]]), label="end_before_start"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[0, 2, 3]]), label="shape"),
    C("segment_reduce", "spans", lambda kw: torch.tensor([[[0, 2]]]), label="rows"),
    C("segment_reduce", "chunk_size", lambda kw: 0, label="zero"),
    C("segment_reduce", "chunk_size", lambda kw: 3, match="exactly one of chunk_size and spans", label="both"),
    C("segment_reduce", "spans", lambda kw: None, match="exactly one of chunk_size and spans", label="neither"),
    C("segment_reduce", "reduce", lambda kw: "median", label="unknown"),
    C("segment_reduce", "lengths", lambda kw: torch.tensor([10, 11, 0]), label="beyond_N"),
    C("segment_reduce", "lengths", lambda kw: torch.tensor([10, -1, 0]), label="negative"),
    C("segment_reduce", "lengths", lambda kw: torch.tensor([10, 4]), label="shape"),
    C("segment_reduce", "backend", lambda kw: "cuda", label="missing_backend"),
    C("segments_to_token_mask", "seg_keep", lambda kw: kw["seg_keep"][:, :2], label="segments"),
    C("segments_to_token_mask", "seg_keep", lambda kw: kw["seg_keep"][0], label="rank"),
    C("segments_to_token_mask", "n_tokens", lambda kw: -1, label="negative"),
    C("segments_to_token_mask", "n_tokens", lambda kw: 9, match="spans", label="below_spans"),
    C("segments_to_token_mask", "spans", lambda kw: torch.tensor([[0, 4], [3, 6], [7, 9]]), label="overlapping"),
    # ---- select_topk
    C("select_topk", "scores", lambda kw: kw["scores"][0], label="rank1"),
    C("select_topk", "scores", lambda kw: kw["scores"][None], label="rank3"),
    C("select_topk", "budget", lambda kw: -1, label="negative"),
    C("select_topk", "budget", lambda kw: 7, label="beyond_row_length"),
    C("select_topk", "budget", lambda kw: 2.0, TypeError, label="float"),
    C("select_topk", "budget", lambda kw: "4", TypeError, label="str"),
    C("select_topk", "budget", lambda kw: torch.tensor([4, -1, 2]), label="tensor_negative"),
    C("select_topk", "budget", lambda kw: torch.tensor([4, 7, 2]), label="tensor_beyond_length"),
    C("select_topk", "budget", lambda kw: torch.tensor([4, 2]), label="tensor_rows"),
    C("select_topk", "budget", lambda kw: torch.tensor([[4], [2], [2]]), label="tensor_rank"),
    C("select_topk", "budget", lambda kw: torch.tensor([4.0, 2.0, 2.0]), TypeError, label="tensor_float"),
    C("select_topk", "budget", lambda kw: torch.tensor([4, 2, 2]).to("meta"), label="tensor_device"),
    C("select_topk", "budget", lambda kw: 1, match="impossible budget", label="below_protected"),
    C("select_topk", "sink", lambda kw: -1, label="negative"),
    C("select_topk", "sink", lambda kw: 1.5, TypeError, label="float"),
    C("select_topk", "sink", lambda kw: 4, match="impossible budget", label="more_than_budget"),
    C("select_topk", "recent", lambda kw: -2, label="negative"),
    C("select_topk", "recent", lambda kw: True, TypeError, label="bool"),
    C("select_topk", "lengths", lambda kw: torch.tensor([10, 6]), label="shape"),
    C("select_topk", "lengths", lambda kw: torch.tensor([11, 6, 4]), label="beyond_N"),
    C("select_topk", "lengths", lambda kw: torch.tensor([10, -6, 4]), label="negative"),
    C("select_topk", "protect", lambda kw: kw["protect"][:, :9], label="shape"),
    C("select_topk", "max_budget", lambda kw: 3, label="below_budget"),
    C("select_topk", "max_budget", lambda kw: -1, label="negative"),
    C("select_topk", "backend", lambda kw: 3, label="not_a_name"),
    # ---- select_segments
    C("select_segments", "seg_scores", lambda kw: kw["seg_scores"][0], label="rank"),
    C("select_segments", "seg_sizes", lambda kw: torch.tensor([2, -3, 1, 4]), label="negative"),
    C("select_segments", "seg_sizes", lambda kw: torch.tensor([2, 3, 1]), label="shape"),
    C("select_segments", "seg_sizes", lambda kw: torch.ones(2, 4, dtype=torch.long), label="rows"),
    C("select_segments", "budget", lambda kw: -5, label="negative"),
    C("select_segments", "budget", lambda kw: 1, match="impossible budget", label="below_protected"),
    C("select_segments", "budget", lambda kw: torch.tensor([6, 1, 6]), match="impossible budget",
      label="tensor_below_protected"),
    C("select_segments", "budget", lambda kw: 6.0, TypeError, label="float"),
    C("select_segments", "policy", lambda kw: "greedy", label="unknown"),
    C("select_segments", "protect", lambda kw: kw["protect"][:, :3], label="shape"),
]


def _snapshot(kw):
    return {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        a, b = a.view(torch.int32 if a.element_size() == 4 else torch.int16), b.view(
            torch.int32 if b.element_size() == 4 else torch.int16)
    return torch.equal(a, b)


def with_backends(cases):
    """Each case with backend="reference" and "triton" (ops without a backend keyword: once)."""
    out = []
    for c in cases:
        op, arg, bad, exc, match = c.values
        out.append(pytest.param(op, arg, bad, exc, match, None, id=c.id))
        if op not in NO_BACKEND and arg != "backend":
            out.append(pytest.param(op, arg, bad, exc, match, "reference", id=c.id + "-reference"))
            out.append(pytest.param(op, arg, bad, exc, match, "triton", id=c.id + "-triton", marks=pytest.mark.triton))
    return out


@pytest.mark.parametrize("op,arg,bad,exc,match,backend", with_backends(generic_cases() + EXPLICIT))
def test_malformed_argument_is_rejected_naming_it(op, arg, bad, exc, match, backend, monkeypatch):
    kw = valid(op)
    dev = devices_for_triton()[0] if backend == "triton" else "cpu"
    if dev != "cpu":
        # on CUDA the value checks run only in debug mode (they sync the host)
        monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
        kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    originals = _snapshot(kw)
    value = bad(kw)
    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
        value = value.to(dev)
    kw[arg] = value
    if op == "select_topk" and arg == "budget" and isinstance(value, torch.Tensor) and dev != "cpu":
        kw["max_budget"] = 10  # required with a CUDA budget tensor (else that error would come first)
    if backend is not None:
        kw["backend"] = backend
    before = _snapshot(kw)
    with pytest.raises(exc, match=match):
        OPS[op](**kw)
    # a rejected call changed nothing: neither the valid inputs nor the bad one
    for k, t in before.items():
        assert _same_bits(t, kw[k]), f"rejected {op} call modified {k}"
    for k, t in originals.items():
        if k != arg:
            assert _same_bits(t, kw[k]), f"rejected {op} call modified {k}"


@pytest.mark.parametrize("op", list(OPS))
def test_valid_inputs_pass(op):
    """The table's valid inputs are accepted (so every case above fails for its one bad argument)."""
    kw = valid(op)
    OPS[op](**kw)


# ------------------------------------------------------------------------------------------------
# Documented behaviours of degenerate but legal inputs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_scores_rank_lowest(backend):
    dev = devices_for_triton()[0] if backend == "triton" else "cpu"
    scores = torch.tensor([[NAN, -INF, 0.5, NAN, INF, -0.0, 0.0, NAN],
                           [NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN]], device=dev)
    for budget, want in [(2, [[2, 4], [0, 1]]), (4, [[2, 4, 5, 6], [0, 1, 2, 3]]),
                         (5, [[1, 2, 4, 5, 6], [0, 1, 2, 3, 4]]), (6, [[0, 1, 2, 4, 5, 6], [0, 1, 2, 3, 4, 5]])]:
        keep, kept = select_topk(scores, budget, backend=backend)
        assert kept.cpu().tolist() == want, budget                        # NaN last, NaNs by position
        assert keep.sum(1).tolist() == [budget, budget]
    seg = select_segments(scores, torch.ones(8, dtype=torch.long, device=dev), 3, backend=backend)
    assert seg.cpu().nonzero().tolist() == [[0, 2], [0, 4], [0, 5], [1, 0], [1, 1], [1, 2]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_through_segment_reduce(backend):
    dev = devices_for_triton()[0] if backend == "triton" else "cpu"
    scores = torch.tensor([[1.0, NAN, 2.0, INF, -INF, 3.0]], device=dev)
    spans = torch.tensor([[0, 2], [2, 3], [3, 5], [5, 6]], device=dev)
    out = {r: segment_reduce(scores, spans=spans, reduce=r, backend=backend).cpu() for r in ("sum", "mean", "max")}
    assert torch.isnan(out["sum"][0, 0]) and torch.isnan(out["mean"][0, 0]) and torch.isnan(out["max"][0, 0])
    assert torch.isnan(out["sum"][0, 2])                                   # inf + -inf
    assert out["max"][0, 2] == INF and out["max"][0, 3] == 3.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_everywhere(backend):
    """B = 0 (or R = 0 rows): every op returns empty outputs of the documented shapes. (``append_`` and
    ``compact_`` with B = 0 crash in the reference backend: reported, test kept out until fixed.)"""
    dev = devices_for_triton()[0] if backend == "triton" else "cpu"
    kp, vp = (t.to(dev) for t in _pools())
    table = torch.zeros(0, 2, 2, dtype=torch.int32, device=dev)
    lengths = torch.zeros(0, 2, dtype=torch.int32, device=dev)
    out, probs = paged_decode_attention(torch.zeros(0, 4, 1, 8, device=dev), kp, vp, table, lengths,
                                        return_probs=True, backend=backend)
    assert out.shape == (0, 4, 1, 8) and probs.shape == (0, 2, 8)
    q, k = torch.zeros(0, 4, 3, 8, device=dev), torch.zeros(0, 2, 10, 8, device=dev)
    assert attention_mass(q, k, backend=backend).shape == (0, 2, 10)
    assert attention_lse(q, k, backend=backend).shape == (0, 4, 3)
    assert attention_mass_paged(q, kp, table, lengths, max_len=8, head_reduce="all_sum",
                                backend=backend).shape == (0, 8)
    keep, kept = select_topk(torch.zeros(0, 10, device=dev), 3, backend=backend)
    assert keep.shape == (0, 10) and kept.shape == (0, 3)
    assert select_segments(torch.zeros(0, 4, device=dev), torch.ones(4, dtype=torch.long, device=dev), 2,
                           backend=backend).shape == (0, 4)
    assert segment_reduce(torch.zeros(0, 10, device=dev), chunk_size=3, backend=backend).shape == (0, 4)
    assert token_norm(k).shape == (0, 2, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_rows_are_no_ops(backend):
    dev = devices_for_triton()[0] if backend == "triton" else "cpu"
    kp, vp = (t.to(dev) for t in _pools())
    table = _table().to(dev)
    k0, v0 = kp.clone(), vp.clone()
    # an append of nothing (counts 0 everywhere; T = 0 crashes the reference backend: reported, test kept
    # out until fixed)
    lengths = torch.tensor([[0, 3], [0, 0]], dtype=torch.int32, device=dev)
    append_(kp, vp, table, lengths, torch.ones(2, 2, 2, 8, device=dev), torch.ones(2, 2, 2, 8, device=dev),
            counts=torch.zeros(2, 2, dtype=torch.int32, device=dev), backend=backend)
    assert torch.equal(kp, k0) and torch.equal(vp, v0) and lengths.cpu().tolist() == [[0, 3], [0, 0]]
    # decoding over empty rows: zeros, not NaN; no probability mass
    q = torch.randn(2, 4, 1, 8, generator=_g()).to(dev)
    out, probs = paged_decode_attention(q, kp, vp, table, lengths, return_probs=True, backend=backend)
    out, probs = out.cpu(), probs.cpu()
    assert torch.equal(out[:, :2][0], torch.zeros(2, 1, 8)) and torch.equal(out[1], torch.zeros(4, 1, 8))
    assert torch.isfinite(out).all() and probs[0, 0].sum() == 0 and probs[1].sum() == 0
    torch.testing.assert_close(probs[0, 1, :3].sum(), torch.tensor(2.0))  # G = 2 query heads, one query each
    # selection over empty rows keeps nothing
    keep, kept = select_topk(torch.randn(2, 5).to(dev), torch.tensor([0, 2], device=dev),
                             lengths=torch.tensor([0, 5], device=dev), max_budget=2, backend=backend)
    assert kept.cpu().tolist()[0] == [-1, -1] and not keep[0].any()
    # segment reductions of empty rows: sum/mean 0, max -inf
    s = torch.randn(2, 6).to(dev)
    for reduce, empty in [("sum", 0.0), ("mean", 0.0), ("max", -INF)]:
        r = segment_reduce(s, chunk_size=4, reduce=reduce, lengths=torch.tensor([0, 6], device=dev), backend=backend)
        assert r.cpu()[0].tolist() == [empty, empty]
    # K = 0 compaction empties every row, moves nothing
    lengths = torch.tensor([[5, 3], [0, 8]], dtype=torch.int32, device=dev)
    compact_(kp, vp, table, lengths, torch.zeros(2, 2, 0, dtype=torch.int32, device=dev), backend=backend)
    assert not lengths.any() and torch.equal(kp, k0) and torch.equal(vp, v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_entries_past_used_pages_and_dead_slots_are_never_read(backend):
    """Entries of the page table past a row's used pages may hold anything (-1, a page id far outside the
    pool), and the slots of a page past the row's length may hold NaN/inf (freed tokens): results are
    those of a clean table and clean pools."""
    dev = devices_for_triton()[0] if backend == "triton" else "cpu"
    kp, vp = (t.to(dev) for t in _pools())
    clean = _table().to(dev)
    lengths = torch.tensor([[4, 3], [0, 5]], dtype=torch.int32, device=dev)   # row (0,0) uses page 0 only
    dirty = clean.clone()
    dirty[0, 0, 1], dirty[0, 1, 1], dirty[1, 0] = 10 ** 6, -1, -7
    kd, vd = kp.clone(), vp.clone()
    kd[2, 3], vd[2, 3] = NAN, INF          # row (0,1): slot 3 is dead
    kd[4:6], vd[4:6] = NAN, -INF            # row (1,0): no token
    kd[7, 1:], vd[7, 1:] = INF, NAN         # row (1,1): slots 5.. dead
    q = torch.randn(2, 4, 2, 8, generator=_g()).to(dev)
    want = paged_decode_attention(q, kp, vp, clean, lengths, return_probs=True, backend=backend)
    got = paged_decode_attention(q, kd, vd, dirty, lengths, return_probs=True, backend=backend)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # scoring: every row holds >= W = 2 tokens; dead slots and unused entries as above
    lens_w = torch.tensor([[4, 3], [2, 5]], dtype=torch.int32, device=dev)
    kd = kp.clone()
    kd[2, 3], kd[4, 2:], kd[5], kd[7, 1:] = NAN, INF, NAN, -INF
    dirty = clean.clone()
    dirty[0, 0, 1], dirty[0, 1, 1], dirty[1, 0, 1] = 10 ** 6, -1, -7
    for head_reduce in ("none", "all_max"):
        want = attention_mass_paged(q, kp, clean, lens_w, max_len=8, head_reduce=head_reduce, backend=backend)
        got = attention_mass_paged(q, kd, dirty, lens_w, max_len=8, head_reduce=head_reduce, backend=backend)
        assert torch.equal(want, got), head_reduce
    # append and compact through a dirty table write and move exactly what a clean one does
    for op in ("append", "compact"):
        pools = [(kp.clone(), vp.clone(), clean), (kp.clone(), vp.clone(), dirty.clone())]
        lens = []
        for k_, v_, t_ in pools:
            L = torch.tensor([[1, 3], [0, 2]], dtype=torch.int32, device=dev)
            if op == "append":
                append_(k_, v_, t_, L, torch.ones(2, 2, 1, 8, device=dev), torch.ones(2, 2, 1, 8, device=dev),
                        backend=backend)
            else:
                compact_(k_, v_, t_, L, torch.tensor([[[0], [2]], [[-1], [1]]], dtype=torch.int32, device=dev),
                         backend=backend)
            lens.append(L)
        assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1]), op
        assert torch.equal(lens[0], lens[1]), op


# ------------------------------------------------------------------------------------------------
# PagedKVCache
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_layers=2.0), TypeError, "num_layers"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(page_size="16"), TypeError, "page_size"),
    (dict(num_pages=0), ValueError, "num_pages"),
    (dict(max_tokens=-1), ValueError, "max_tokens"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(dtype="float16"), TypeError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(backend="numba"), ValueError, "backend"),
])
def test_cache_constructor_rejects(kwargs, exc, match):
    args = dict(num_layers=2, batch_size=2, num_kv_heads=2, head_dim=8)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        PagedKVCache(args.pop("num_layers"), args.pop("batch_size"), args.pop("num_kv_heads"), args.pop("head_dim"),
                     **args)


def _filled_cache():
    c = PagedKVCache(2, 2, 2, 8, page_size=4, dtype=torch.float32, num_pages=16, grow=False)
    g = _g(3)
    for layer in range(2):
        c.append(layer, torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g))
    return c


def _cache_state(c):
    return [c.k_pages.clone(), c.v_pages.clone(), c.pos_pages.clone(), c.page_table.clone(), c.lengths.clone(),
            c._table_h.copy(), c._owned_h.copy(), c._len_h.copy(), c._seen_h.copy(), c._free[:c._nfree].copy()]


def _assert_state(c, state):
    c.check_invariants()
    for a, b in zip(state, _cache_state(c)):
        assert (_same_bits(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b))


KEPT = torch.tensor([0, 2, 5, -1], dtype=torch.int32).expand(2, 2, 4).contiguous()
X = torch.zeros(2, 2, 3, 8)
KEPT_T3 = torch.tensor([0, 2, -1, -1], dtype=torch.int32).expand(2, 2, 4).contiguous()   # of X's 3 tokens


@pytest.mark.parametrize("call,exc,match", [
    (lambda c: c.append(2, X, X), ValueError, "layer"),
    (lambda c: c.append(-1, X, X), ValueError, "layer"),
    (lambda c: c.append(0.0, X, X), TypeError, "layer"),
    (lambda c: c.append(0, X[:1], X[:1]), ValueError, r"\bk\b"),
    (lambda c: c.append(0, X, X[:, :, :2]), ValueError, r"\bv\b"),
    (lambda c: c.append(0, X.half(), X.half()), TypeError, r"\bk\b"),
    (lambda c: c.append(0, X.to("meta"), X), ValueError, r"\bk\b"),
    (lambda c: c.append(0, X, X.to("meta")), ValueError, r"\bv\b"),
    (lambda c: c.append(0, X[..., :4], X[..., :4]), ValueError, r"\bk\b"),
    (lambda c: c.append(0, strided(torch.zeros(2, 2, 3, 8)), X), ValueError, r"\bk\b"),
    (lambda c: c.append(0, X, X, counts=4), ValueError, "counts"),
    (lambda c: c.append(0, X, X, counts=[-1, 0]), ValueError, "counts"),
    (lambda c: c.append(0, X, X, counts=1.5), TypeError, "counts"),
    (lambda c: c.append(0, X, X, counts=[1, 2, 3]), ValueError, "counts"),
    (lambda c: c.append(0, X, X, positions=torch.zeros(2, 4, dtype=torch.long)), ValueError, "positions"),
    (lambda c: c.append(0, X, X, positions=torch.zeros(2, 3)), TypeError, "positions"),
    (lambda c: c.compact(2, KEPT), ValueError, "layer"),
    (lambda c: c.compact(0, KEPT[0]), ValueError, "kept_idx"),
    (lambda c: c.compact(0, KEPT[:1]), ValueError, "kept_idx"),
    (lambda c: c.compact(0, KEPT.float()), TypeError, "kept_idx"),
    (lambda c: c.compact(0, KEPT.to("meta")), ValueError, "kept_idx"),
    (lambda c: c.compact(0, KEPT + 4), ValueError, "kept_idx"),                        # slot 9 >= length 6
    (lambda c: c.compact(0, KEPT.flip(-1).contiguous()), ValueError, "kept_idx"),       # padding first
    (lambda c: c.compact(0, torch.tensor([2, 0, -1, -1], dtype=torch.int32).expand(2, 2, 4).contiguous()),
     ValueError, "kept_idx"),
    (lambda c: c.compact(0, KEPT, new_lengths=np.full((2, 2), 2)), ValueError, "new_lengths"),
    (lambda c: c.compact(0, KEPT, new_lengths=np.full((2,), 3)), ValueError, "new_lengths"),
    (lambda c: c.compact(0, KEPT, new_lengths=np.full((2, 2), 3.0)), TypeError, "new_lengths"),
    (lambda c: c.compact(0, KEPT, new_lengths=np.full((2, 2), 7)), ValueError, "new_lengths"),
    # mismatched layer counts
    (lambda c: c.compact_all(KEPT[None].expand(3, 2, 2, 4)), ValueError, "kept_idx"),
    (lambda c: c.compact_all(KEPT[None]), ValueError, "kept_idx"),
    (lambda c: c.compact_all(KEPT), ValueError, "kept_idx"),
    (lambda c: c.compact_all(KEPT[None].expand(2, 2, 2, 4), new_lengths=np.full((3, 2, 2), 3)), ValueError,
     "new_lengths"),
    (lambda c: c.reserve(0, -1), ValueError, "extra_tokens"),
    (lambda c: c.reserve(0, 1.5), TypeError, "extra_tokens"),
    # host ints beyond int64: a cast would wrap 2**63 to -2**63 (numpy: uint64, overflow, or float64 for a list)
    (lambda c: c.reserve(0, 2 ** 63), ValueError, "extra_tokens must hold values in the int64 range"),
    (lambda c: c.reserve(0, 2 ** 64), ValueError, "extra_tokens must hold values in the int64 range"),
    (lambda c: c.reserve(0, -2 ** 63 - 1), ValueError, "extra_tokens must hold values in the int64 range"),
    (lambda c: c.reserve(0, [2 ** 63, 0]), ValueError, "extra_tokens must hold values in the int64 range"),
    (lambda c: c.reserve(0, np.uint64(2 ** 64 - 1)), ValueError, "extra_tokens must hold values in the int64 range"),
    (lambda c: c.append(0, X, X, counts=torch.tensor([2 ** 63, 0], dtype=torch.uint64)), ValueError,
     "counts must hold values in the int64 range"),
    (lambda c: c.append_kept(0, X, X, KEPT_T3, seen=[[2 ** 63, 1], [1, 1]]), ValueError,
     "seen must hold values in the int64 range"),
    (lambda c: c.compact(0, KEPT, new_lengths=np.full((2, 2), 2 ** 63, dtype=np.uint64)), ValueError,
     "new_lengths must hold values in the int64 range"),
    (lambda c: c.reserve(3, 1), ValueError, "layer"),
    (lambda c: c.free_sequence(2), ValueError, "seq"),
    (lambda c: c.free_sequence(-1), ValueError, "seq"),
    (lambda c: c.free_sequence("0"), TypeError, "seq"),
    (lambda c: c.owned_pages(0, 0, 2), ValueError, "head"),
    (lambda c: c.gather(5), ValueError, "layer"),
    (lambda c: c.layer_view(-1), ValueError, "layer"),
    (lambda c: c.seq_lengths(2), ValueError, "layer"),
])
def test_cache_rejects_and_changes_nothing(call, exc, match):
    c = _filled_cache()
    state = _cache_state(c)
    with pytest.raises(exc, match=match):
        call(c)
    _assert_state(c, state)


def test_cache_positions_beyond_int32_are_rejected_before_anything_changes():
    """Default positions are stored as int32 (``pos_pages``): new tokens whose position ``seen_tokens + t``
    would not fit are a named error, not wrapped positions. Reaching it honestly takes 2**31 appended
    tokens, so the host counts are set directly."""
    c = _filled_cache()
    c._seen_h[0, 1, 0] = 2 ** 31 - 2                    # positions 2**31 - 2 + [0, 3): the last one overflows
    state = _cache_state(c)
    with pytest.raises(ValueError, match="seen_tokens"):
        c.append(0, X, X)
    _assert_state(c, state)
    with pytest.raises(ValueError, match="seen_tokens"):
        c.append_kept(0, X, X, KEPT_T3)
    _assert_state(c, state)
    # the boundary: positions up to 2**31 - 1 are stored as they are
    c = PagedKVCache(1, 1, 1, 8, page_size=4, dtype=torch.float32, num_pages=2, grow=False)
    c._seen_h[0, 0, 0] = 2 ** 31 - 3
    c.append(0, X[:1, :1], X[:1, :1])
    assert c.gather(0)[3][0, 0, :3].tolist() == [2 ** 31 - 3, 2 ** 31 - 2, 2 ** 31 - 1]
    state = _cache_state(c)
    with pytest.raises(ValueError, match="seen_tokens"):
        c.append(0, X[:1, :1, :1], X[:1, :1, :1])
    _assert_state(c, state)


def test_cache_full_changes_nothing_and_freed_pages_are_reused():
    c = PagedKVCache(2, 2, 2, 8, page_size=4, dtype=torch.float32, num_pages=10, grow=False)
    x = torch.randn(2, 2, 4, 8, generator=_g())
    c.append(0, x, x)                                   # 4 pages
    c.append(1, x, x)                                   # 8 pages
    state = _cache_state(c)
    with pytest.raises(CacheFullError, match="num_pages"):
        c.append(0, x, x)                               # needs 4, 2 free
    _assert_state(c, state)
    with pytest.raises(CacheFullError, match="num_pages"):
        c.reserve(1, [[1, 1], [1, 5]])
    _assert_state(c, state)
    c.free_sequence(1)                                  # 4 pages back: 6 free
    c.append(0, x, x)                                   # needs 4: fits only if the freed pages are reused
    c.check_invariants()
    assert c.num_free_pages() == 2 and c.seq_lengths(0).tolist() == [[8, 8], [4, 4]]


# ------------------------------------------------------------------------------------------------
# Methods and shots
# ------------------------------------------------------------------------------------------------

METHOD_CLASSES = [kk.SnapKV, kk.PyramidKV, kk.ChunkKV, kk.StreamingLLM, kk.H2O, kk.TOVA, kk.KNorm, kk.ShotKV]


@pytest.mark.parametrize("cls", METHOD_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad,exc", [(0.0, ValueError), (-0.1, ValueError), (1.0001, ValueError), (NAN, ValueError),
                                     (INF, ValueError), ("0.5", TypeError), (True, TypeError), ([0.5], TypeError)])
def test_keep_ratio_outside_unit_interval(cls, bad, exc):
    with pytest.raises(exc, match="keep_ratio"):
        cls(bad)
    with pytest.raises(exc, match="keep_ratio"):
        cls(keep_ratio=bad)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: kk.SnapKV(0.5, window_size=0), ValueError, "window_size"),
    (lambda: kk.SnapKV(0.5, window_size=2.5), TypeError, "window_size"),
    (lambda: kk.SnapKV(0.5, kernel_size=2), ValueError, "kernel_size"),
    (lambda: kk.SnapKV(0.5, kernel_size=0), ValueError, "kernel_size"),
    (lambda: kk.SnapKV(0.5, pooling="mean"), ValueError, "pooling"),
    (lambda: kk.PyramidKV(0.5, beta=0), ValueError, "beta"),
    (lambda: kk.ChunkKV(0.5, chunk_size=0), ValueError, "chunk_size"),
    (lambda: kk.ChunkKV(0.5, policy="all"), ValueError, "policy"),
    (lambda: kk.ChunkKV(0.5, reuse_every=0), ValueError, "reuse_every"),
    (lambda: kk.StreamingLLM(0.5, n_sink=-1), ValueError, "n_sink"),
    (lambda: kk.H2O(0.5, recent_ratio=-0.5), ValueError, "recent_ratio"),
    (lambda: kk.H2O(0.5, recent_ratio=NAN), ValueError, "recent_ratio"),
    (lambda: kk.ShotKV(0.5, 0.0), ValueError, "decode_keep_ratio"),
    (lambda: kk.ShotKV(0.5, 1.5), ValueError, "decode_keep_ratio"),
    (lambda: kk.ShotKV(0.5, keep_ratio=0.5), ValueError, "keep_ratio"),
    (lambda: kk.ShotKV(0.5, window_size=0), ValueError, "window_size"),
    (lambda: kk.ShotKV(0.5, fallback_window=0), ValueError, "fallback_window"),
    (lambda: kk.ShotKV(0.5, decode_recent=-1), ValueError, "decode_recent"),
    (lambda: kk.ShotKV(0.5, policy="greedy"), ValueError, "policy"),
])
def test_method_options_rejected(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("spans,n,exc,match", [
    ([(0, 5), (4, 8)], 10, ValueError, "overlap"),
    ([(4, 8), (0, 5)], 10, ValueError, "overlap"),
    ([(0, 11)], 10, ValueError, "out of range"),
    ([(-1, 3)], 10, ValueError, "out of range"),
    ([(3, 3)], 10, ValueError, "out of range or empty"),
    ([(5, 2)], 10, ValueError, "out of range"),
    ([(0, 2.5)], 10, TypeError, "shots"),
    ([(0, 2, 3)], 10, TypeError, "shots"),
    ([(True, 2)], 10, TypeError, "shots"),
    ("0-5", 10, TypeError, "shots"),
    (5, 10, TypeError, "shots"),
])
def test_bad_shot_spans(spans, n, exc, match):
    with pytest.raises(exc, match=match):
        validate_spans(spans, n)


@pytest.mark.parametrize("shots,lengths,match", [
    ([(0, 3)], [10, 8], "one span list per sequence|2 span lists"),
    ([[(0, 3)]], [10, 8], "one span list per sequence"),
    ([[(0, 3)], [(0, 9)]], [10, 8], r"shots\[1\].*out of range"),
    ([[(0, 3), (2, 4)], []], [10, 8], r"shots\[0\].*overlap"),
])
def test_bad_batch_shots(shots, lengths, match):
    with pytest.raises(ValueError, match=match):
        normalize_batch_shots(shots, lengths)


# ------------------------------------------------------------------------------------------------
# transformers integration
# ------------------------------------------------------------------------------------------------

def tiny_llama(layers=2, seed=0):
    # transformers' default initializer range: this model only needs to run, not to make clear choices
    return _fixtures.tiny_llama(4, 2, 8, layers, seed, vocab=61, max_positions=64, initializer_range=0.02)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


IDS = torch.arange(3, 23).view(1, 20)


def _restored(model):
    return model.config._attn_implementation != ATTN_IMPLEMENTATION and "generate" not in model.__dict__


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: kk.generate(torch.nn.Linear(2, 2), IDS, None), TypeError, "model"),
    (lambda m: kk.generate(m, IDS, kk.SnapKV), TypeError, "method"),
    (lambda m: kk.generate(m, IDS, "snapkv"), TypeError, "method"),
    (lambda m: kk.generate(m, IDS, None, page_size=0), ValueError, "page_size"),
    (lambda m: kk.generate(m, IDS, None, page_size=2.0), TypeError, "page_size"),
    (lambda m: kk.generate(m, IDS, None, backend="tpu"), ValueError, "backend"),
    (lambda m: kk.generate(m, IDS, None, num_beams=2), ValueError, "num_beams"),
    (lambda m: kk.generate(m, IDS, kk.ShotKV(0.5)), ValueError, "shots"),
    (lambda m: kk.generate(m, IDS, kk.ShotKV(0.5), shots=[(0, 8), (5, 12)]), ValueError, "overlap"),
    (lambda m: kk.generate(m, IDS, kk.ShotKV(0.5), shots=[(0, 21)]), ValueError, "out of range"),
    (lambda m: kk.generate(m, IDS, kk.ShotKV(0.5), shots=[[(0, 3)], [(0, 3)]]), ValueError, "one span list"),
    (lambda m: kk.generate(m, IDS, kk.SnapKV(0.5), attention_mask=torch.zeros(1, 20, dtype=torch.long)),
     ValueError, "attention_mask"),
])
def test_integration_rejects_and_restores_the_model(llama, call, exc, match):
    with pytest.raises(exc, match=match):
        call(llama)
    assert _restored(llama)
    out, _ = kk.generate(llama, IDS, kk.SnapKV(0.5, window_size=4), max_new_tokens=2)   # still works
    assert out.shape == (1, 22)


def test_integration_mismatched_layer_counts(llama):
    """A cache built for a model with another number of layers (or another model) is refused."""
    other = tiny_llama(layers=3)
    with kk.compress(llama, None):
        with pytest.raises(ValueError, match="another model"):
            llama.generate(IDS, past_key_values=PagedCache(other, None), max_new_tokens=2)
        with pytest.raises(ValueError, match="past_key_values"):
            llama.generate(IDS, past_key_values=object(), max_new_tokens=2)
        with pytest.raises(RuntimeError, match="already active"):
            with kk.compress(llama, None):
                pass
    assert _restored(llama)
    with pytest.raises(TypeError, match="method"):
        PagedCache(llama, kk.H2O)


def test_kvpress_presses_reject_bad_ratios():
    kvp = pytest.importorskip("kvpress_kernels.integrations.kvpress")
    for cls in (kvp.SnapKVPress, kvp.PyramidKVPress, kvp.StreamingLLMPress, kvp.KnormPress,
                kvp.ObservedAttentionPress):
        for bad in (-0.1, 1.0, NAN):
            with pytest.raises(ValueError, match="compression_ratio"):
                cls(bad)
        with pytest.raises(TypeError, match="compression_ratio"):
            cls("0.5")
    with pytest.raises(ValueError, match="backend"):
        kvp.SnapKVPress(0.5, backend="tpu")
    with pytest.raises(TypeError, match="shots"):
        kvp.ShotKVPress(0.5, shots="0-10")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["bogus"], "invalid choice"),
    (["eval", "--keep-ratios", "1.5"], "keep-ratios"),
    (["eval", "--keep-ratios", "0"], "keep-ratios"),
    (["eval", "--keep-ratios", "nan"], "keep-ratios"),
    (["eval", "--keep-ratios", "abc"], "keep-ratios"),
    (["eval", "--methods", "foo"], "methods"),
    (["eval", "--n", "0"], "--n"),
    (["eval", "--n", "-3"], "--n"),
    (["eval", "--settings", "bad"], "settings"),
    (["demo", "--shots", "0"], "shots"),
    (["demo", "--keep-ratio", "-0.1"], "keep-ratio"),
    (["demo", "--max-new-tokens", "x"], "max-new-tokens"),
    (["bench", "--ops", "nope"], "ops"),
    (["bench", "--device", "tpu"], "device"),
])
def test_cli_bad_arguments_exit_2_naming_the_option(argv, match):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    assert rc == 2
    msg = err.getvalue()
    assert msg.count("\n") == 1 and msg.startswith("kvpress-kernels: error:"), msg   # one line, no traceback
    assert re.search(match, msg), msg


def test_cli_unwritable_output_and_unknown_task(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, match in [(["eval", "--out", str(blocker / "sub")], "output directory"),
                        (["eval", "--tasks", "nope", "--out", str(tmp_path / "e")], "unknown task")]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(argv) == 2
        assert match in err.getvalue()


def test_cli_bad_argument_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "kvpress_kernels.cli", "eval", "--keep-ratios", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "keep-ratios" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------
# Generated classes (issue 11). Nothing below lists instances: every case is derived from the valid
# inputs above (and the variants that switch on their optional tensor forms), argument by argument,
# element by element. The first sweep missed a negative ``lengths`` in append_ (a cross-row write), a
# column-major ``protect`` in Triton select_segments (a wrong kept set), a NaN lse that Triton turned
# into -inf, a budget >= 2**63 (OverflowError) and token_norm on an empty batch with lengths: each is a
# member of one class here.
# ------------------------------------------------------------------------------------------------

def valid_variants(op: str) -> dict:
    """``{name: kwargs}``: the valid inputs of ``op`` plus the optional forms the default leaves out."""
    out = {"default": valid(op)}
    if op == "select_topk":
        out["budget_tensor"] = dict(valid(op), budget=torch.tensor([4, 4, 3]), max_budget=5)
    if op == "select_segments":
        out["budget_tensor"] = dict(valid(op), budget=torch.tensor([6, 5, 7]),
                                    seg_sizes=torch.tensor([[2, 3, 1, 4], [1, 1, 2, 2], [3, 0, 2, 1]]))
    if op == "attention_mass":
        kw = valid(op)
        lse = attention_lse(kw["q"], kw["k"], lengths=kw["lengths"], scale=kw["scale"], backend="reference")
        out["lse"] = dict(kw, lse=lse, head_reduce="group_max", pool="max")
    if op == "segment_reduce":
        out["chunks"] = dict(valid(op), spans=None, chunk_size=4, reduce="mean")
    return out


POSITIONS = {"pos_pages", "pos_new"}            # original token positions: data, no range of their own
SENTINELS = {("compact_", "kept_idx"): {-1}}   # kept_idx's padding value is legal anywhere after the kept slots
UNBOUNDED = {("select_segments", "budget")}     # a budget above every segment together keeps them all
MUTATED = {"k_pages", "v_pages", "lengths", "pos_pages"}   # written in place by append_ / compact_


def variant_args(op: str, variant: str) -> list[str]:
    """The arguments a variant exercises: all of the default's, only the new or changed ones of the others
    (the rest is covered by the default already)."""
    kw, default = valid_variants(op)[variant], valid(op)
    if variant == "default":
        return list(kw)

    def same(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
                and a.dtype == b.dtype and torch.equal(a, b)
        return a == b
    return [k for k in kw if k not in default or not same(kw[k], default[k])]


def _dev_kwargs(kw: dict, dev) -> dict:
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _clone(kw: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _run(op: str, kw: dict, backend):
    """``(error, outputs, tensor inputs after the call)``; only TypeError/ValueError count as a rejection."""
    call = dict(kw)
    if backend is not None and op not in NO_BACKEND:
        call["backend"] = backend
    try:
        out = OPS[op](**call)
    except (TypeError, ValueError) as exc:
        return exc, None, None
    return None, out, {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}


def _flat(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]


def _backends_for(op):
    if op in NO_BACKEND:
        return [None]
    return ["reference", "triton"]


def _param(op, *rest, backend, ident):
    marks = [pytest.mark.triton] if backend == "triton" else []
    return pytest.param(op, *rest, backend, id=f"{ident}-{backend}" if backend else ident, marks=marks)


def _target(backend) -> str:
    return devices_for_triton()[0] if backend == "triton" else "cpu"


# ---- class 1: every per-row integer input, every element, negative and out-of-range values -------

def _int_args(kw: dict) -> list[str]:
    return [k for k, v in kw.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()
            and v.dtype != torch.bool and k not in POSITIONS]


def per_row_int_cases():
    out = []
    for op in OPS:
        for variant, kw in valid_variants(op).items():
            for arg in [a for a in _int_args(kw) if a in variant_args(op, variant)]:
                for backend in _backends_for(op):
                    out.append(_param(op, variant, arg, backend=backend, ident=f"{op}-{variant}-{arg}"))
    return out


@pytest.mark.parametrize("op,variant,arg,backend", per_row_int_cases())
def test_corrupted_integer_is_rejected_before_any_write_or_never_read(op, variant, arg, backend, monkeypatch):
    """Each element of each integer tensor input, set in turn to -1, -2 and its dtype's extremes: the
    call raises a ValueError naming the argument and changes nothing, or - where the element is never
    read (page-table entries past a row's used pages) - gives exactly the clean call's results."""
    dev = _target(backend)
    if dev != "cpu":
        monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
    base = _dev_kwargs(valid_variants(op)[variant], dev)
    err, clean_out, clean_in = _run(op, _clone(base), backend)
    assert err is None, err
    info = torch.iinfo(base[arg].dtype)
    values = [v for v in (-1, -2, info.min, info.max) if v not in SENTINELS.get((op, arg), ())
              and not (v > 0 and (op, arg) in UNBOUNDED)]
    rejected = 0
    for i in range(base[arg].numel()):
        for value in values:
            kw = _clone(base)
            kw[arg].view(-1)[i] = value
            before = _clone(kw)
            err, out, after = _run(op, kw, backend)
            where = f"{arg}.flat[{i}] = {value}"
            if err is not None:
                assert isinstance(err, ValueError) and re.search(rf"\b{arg}\b", str(err)), (where, repr(err))
                for k, t in before.items():
                    if isinstance(t, torch.Tensor):
                        assert _same_bits(t, kw[k]), f"rejected call ({where}) modified {k}"
                rejected += 1
                continue
            # accepted: then the element was never read
            for a, b in zip(_flat(out), _flat(clean_out)):
                assert _same_bits(a, b), f"{where} was accepted but changed the result"
            for k, t in after.items():
                if k != arg:
                    assert _same_bits(t, clean_in[k]), f"{where} was accepted but changed {k}"
    assert rejected, "no corrupted value was rejected: the sweep is not reaching the checks"


# ---- class 2: every tensor input of every Triton launcher as a transposed / sliced / expanded view -

VIEW_KINDS = ("transposed", "sliced", "expanded")


def make_view(t: torch.Tensor, kind: str, unit_last: bool):
    """A non-contiguous tensor: ``transposed`` (same values, leading dims stored in reverse order),
    ``sliced`` (same values, every leading stride doubled, nonzero storage offset) or ``expanded``
    (index 0 of the first leading dim longer than 1, broadcast with stride 0: other values). The last
    dim keeps its unit stride when the argument requires it. ``None`` if the kind does not apply."""
    nd = t.dim()
    lead = nd - 1 if unit_last else nd
    if kind == "transposed":
        if lead < 2:
            return None
        perm = list(reversed(range(lead))) + list(range(lead, nd))   # its own inverse
        return t.permute(perm).contiguous().permute(perm)
    if kind == "sliced":
        if lead < 1 or t.numel() == 0:
            return None
        big = torch.zeros([2 * n + 1 if d < lead else n for d, n in enumerate(t.shape)], dtype=t.dtype,
                          device=t.device)
        v = big[tuple(slice(1, None, 2) if d < lead else slice(None) for d in range(nd))]
        v.copy_(t)
        return v
    dims = [d for d in range(lead) if t.shape[d] > 1]
    if not dims:
        return None
    return t.narrow(dims[0], 0, 1).expand(t.shape)


def _op_args(with_backend_only=True):
    """``(op, variant, arg, value)`` for every argument of every valid variant of every op (only the ops with a
    Triton backend to compare with the reference, by default)."""
    for op in OPS:
        if with_backend_only and op in NO_BACKEND:
            continue
        for variant, kw in valid_variants(op).items():
            for arg in variant_args(op, variant):
                yield op, variant, arg, kw[arg]


def view_cases():
    return [pytest.param(op, variant, arg, kind, id=f"{op}-{variant}-{arg}-{kind}", marks=pytest.mark.triton)
            for op, variant, arg, v in _op_args() if isinstance(v, torch.Tensor)
            for kind in VIEW_KINDS if make_view(v, kind, (op, arg) in UNIT_STRIDE) is not None]


def _assert_same_results(got, want, what):
    for a, b in zip(_flat(got), _flat(want)):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, equal_nan=True, msg=what)
        else:
            assert torch.equal(a, b), f"{what}: {int((a != b).sum())} elements differ"


@pytest.mark.parametrize("op,variant,arg,kind", view_cases())
def test_strided_views_give_the_reference_result_on_triton(op, variant, arg, kind):
    """The Triton launchers either pass all of an input's strides to the kernel or make it contiguous:
    with one input replaced by a view, Triton equals the reference on the same view (bit for bit for
    selection and data movement; fp32 rounding for scores), or both reject it with the same error. In
    place outputs must not be expanded views (two elements would share memory): a ValueError naming them."""
    dev = devices_for_triton()[0]

    def build():
        kw = _dev_kwargs(valid_variants(op)[variant], dev)
        kw[arg] = make_view(kw[arg], kind, (op, arg) in UNIT_STRIDE)
        return kw

    ref_err, ref_out, ref_in = _run(op, build(), "reference")
    tri_err, tri_out, tri_in = _run(op, build(), "triton")
    if op in MUTATING and arg in MUTATED and kind == "expanded":
        assert isinstance(ref_err, ValueError) and re.search(rf"\b{arg}\b", str(ref_err)), repr(ref_err)
    if ref_err is not None or tri_err is not None:
        assert type(ref_err) is type(tri_err) and str(ref_err) == str(tri_err), (repr(ref_err), repr(tri_err))
        return
    _assert_same_results(tri_out, ref_out, f"{op}({arg}={kind} view)")
    for k in MUTATED & set(ref_in):
        assert _same_bits(tri_in[k].contiguous(), ref_in[k].contiguous()), f"{op}({arg}={kind} view) wrote {k} differently"


# ---- class 3: NaN / +inf / -inf in every float input, every backend the same documented result ----

def nan_cases():
    return [pytest.param(op, variant, arg, float(value), id=f"{op}-{variant}-{arg}-{value}", marks=pytest.mark.triton)
            for op, variant, arg, v in _op_args() if isinstance(v, torch.Tensor) and v.is_floating_point()
            for value in ("nan", "inf", "-inf")]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter: inf - inf
@pytest.mark.parametrize("op,variant,arg,value", nan_cases())
def test_non_finite_inputs_give_the_same_result_on_every_backend(op, variant, arg, value):
    """The value is written at three places of the input at once (first, middle and last element:
    live and dead slots, visible and masked keys). Reference and Triton give the same outputs, NaN and
    inf at the same places (the rules are in docs/RELIABILITY.md: a query that sees a NaN or +inf
    logit gets a NaN lse, NaN weights on every key it sees and a NaN output; NaN ranks lowest in
    selection; NaN propagates through segment and pooling maxima)."""
    dev = devices_for_triton()[0]

    def build():
        kw = _dev_kwargs(valid_variants(op)[variant], dev)
        flat = kw[arg].view(-1)
        for i in {0, flat.numel() // 2, flat.numel() - 1}:
            flat[i] = value
        return kw

    ref_err, ref_out, ref_in = _run(op, build(), "reference")
    tri_err, tri_out, tri_in = _run(op, build(), "triton")
    assert ref_err is None and tri_err is None, (repr(ref_err), repr(tri_err))
    _assert_same_results(tri_out, ref_out, f"{op}({arg} with {value})")
    for k in MUTATED & set(ref_in):
        assert _same_bits(tri_in[k], ref_in[k]), f"{op}({arg} with {value}) wrote {k} differently"


# ---- class 4: every integer argument beyond int64 ---------------------------------------------------

def int64_cases():
    return [pytest.param(op, variant, arg, value, id=f"{op}-{variant}-{arg}-{label}")
            for op, variant, arg, v in _op_args(with_backend_only=False)
            if isinstance(v, int) and not isinstance(v, bool)
            for value, label in ((2 ** 63, "2**63"), (-(2 ** 63) - 1, "-2**63-1"), (2 ** 100, "2**100"))]


@pytest.mark.parametrize("op,variant,arg,value", int64_cases())
def test_integer_beyond_int64_is_a_value_error_naming_it(op, variant, arg, value):
    kw = valid_variants(op)[variant]
    kw[arg] = value
    before = _snapshot(kw)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        OPS[op](**kw)
    assert all(_same_bits(t, kw[k]) for k, t in before.items())


# ---- class 5: an empty batch (zero rows) with every optional argument given ----------------------

ROW_FREE = {"k_pages", "v_pages", "pos_pages"}   # pools: their first dim is pages, not rows


def _empty_rows(op: str, kw: dict) -> dict:
    out = dict(kw)
    for k, v in kw.items():
        if not isinstance(v, torch.Tensor) or k in ROW_FREE:
            continue
        if k == "spans" and v.dim() == 2 or k == "seg_sizes" and v.dim() == 1:
            continue   # shared by every row
        out[k] = v[:0]
    return out


def empty_cases():
    return [_param(op, variant, backend=b, ident=f"{op}-{variant}") for op in OPS for variant in valid_variants(op)
            for b in _backends_for(op)]


@pytest.mark.parametrize("op,variant,backend", empty_cases())
def test_empty_batch_with_every_optional_argument(op, variant, backend):
    dev = _target(backend)
    kw = _dev_kwargs(_empty_rows(op, valid_variants(op)[variant]), dev)
    before = _clone(kw)
    err, out, after = _run(op, kw, backend)
    assert err is None, repr(err)
    for o in _flat(out):
        assert o.numel() == 0, f"{op} on zero rows returned shape {list(o.shape)}"
    for k, t in before.items():
        if isinstance(t, torch.Tensor):
            assert _same_bits(t, after[k]), f"{op} on zero rows modified {k}"


# ---- integration entry points: input_ids / attention_mask / shots, like the ops -----------------

def _entry_points():
    def direct(m, ids, **kw):
        return kk.generate(m, ids, kk.SnapKV(0.5, window_size=4), max_new_tokens=2, **kw)

    def inside(m, ids, **kw):
        shots = kw.pop("shots", None)
        with kk.compress(m, kk.ShotKV(0.5) if shots is not None else kk.SnapKV(0.5, window_size=4), shots=shots):
            return m.generate(ids, max_new_tokens=2, **kw)
    return {"generate": direct, "compress": inside}


MASK = torch.ones(1, 20, dtype=torch.long)
INPUT_CLASSES = [
    # (label, kwargs builder, exception, argument named)
    ("ids_rank1", lambda: dict(ids=IDS[0]), ValueError, "input_ids"),
    ("ids_rank3", lambda: dict(ids=IDS[None]), ValueError, "input_ids"),
    ("ids_float", lambda: dict(ids=IDS.float()), TypeError, "input_ids"),
    ("ids_bool", lambda: dict(ids=IDS > 5), TypeError, "input_ids"),
    ("ids_list", lambda: dict(ids=IDS.tolist()), TypeError, "input_ids"),
    ("ids_meta", lambda: dict(ids=IDS.to("meta")), ValueError, "input_ids"),
    ("ids_negative", lambda: dict(ids=torch.where(IDS == 7, -1, IDS)), ValueError, "input_ids"),
    ("ids_beyond_vocab", lambda: dict(ids=torch.where(IDS == 7, 61, IDS)), ValueError, "input_ids"),
    ("ids_no_tokens", lambda: dict(ids=IDS[:, :0]), ValueError, "input_ids"),
    ("ids_no_rows", lambda: dict(ids=IDS[:0]), ValueError, "input_ids"),
    ("mask_float", lambda: dict(ids=IDS, attention_mask=MASK.float()), TypeError, "attention_mask"),
    ("mask_shape", lambda: dict(ids=IDS, attention_mask=MASK[:, :10]), ValueError, "attention_mask"),
    ("mask_rank", lambda: dict(ids=IDS, attention_mask=MASK[0]), ValueError, "attention_mask"),
    ("mask_value_2", lambda: dict(ids=IDS, attention_mask=MASK * 2), ValueError, "attention_mask"),
    ("mask_negative", lambda: dict(ids=IDS, attention_mask=-MASK), ValueError, "attention_mask"),
    ("mask_empty_row", lambda: dict(ids=IDS, attention_mask=MASK * 0), ValueError, "attention_mask"),
    ("mask_meta", lambda: dict(ids=IDS, attention_mask=MASK.to("meta")), ValueError, "attention_mask"),
    ("shots_str", lambda: dict(ids=IDS, shots="0-5"), TypeError, "shots"),
    ("shots_float", lambda: dict(ids=IDS, shots=[(0, 2.5)]), TypeError, "shots"),
    ("shots_beyond_prompt", lambda: dict(ids=IDS, shots=[(0, 21)]), ValueError, "shots"),
    ("shots_beyond_unpadded", lambda: dict(ids=IDS, attention_mask=torch.cat([MASK[:, :5] * 0, MASK[:, 5:]], 1),
                                           shots=[(0, 16)]), ValueError, "shots"),
    ("shots_overlap", lambda: dict(ids=IDS, shots=[(0, 5), (4, 8)]), ValueError, "shots"),
]


@pytest.mark.parametrize("entry", ["generate", "compress"])
@pytest.mark.parametrize("label,make,exc,name", INPUT_CLASSES, ids=[c[0] for c in INPUT_CLASSES])
def test_entry_points_validate_inputs_like_the_ops(llama, entry, label, make, exc, name):
    kw = make()
    ids = kw.pop("ids")
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _entry_points()[entry](llama, ids, **kw)
    assert _restored(llama)


@pytest.mark.parametrize("flags,exc", [("1", TypeError), (1.5, TypeError), (None, TypeError), (True, TypeError),
                                       (-1, ValueError), (1 << 40, ValueError), (re.LOCALE, ValueError)])
def test_find_shots_flags_named(flags, exc):
    from kvpress_kernels.shots import find_shots
    with pytest.raises(exc, match="flags"):
        find_shots("Q: a\nA: b\n", None, flags=flags)


def test_find_shots_bad_pattern_and_option_named():
    from kvpress_kernels.shots import find_shots
    with pytest.raises(ValueError, match="pattern"):
        find_shots("Q: a", None, pattern="(")
    with pytest.raises(TypeError, match="add_special_tokens"):
        find_shots("Q: a", None, add_special_tokens="yes")
