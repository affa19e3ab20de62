"""Python wrappers of the torch-free CUDA extension ``kvpress_kernels._C``.

Each wrapper checks its tensors (``TypeError``/``ValueError`` naming the argument), then hands the
extension raw data pointers, element strides, element widths and the current CUDA stream of the
tensors' device, and turns a nonzero status into a ``RuntimeError`` that names the op and the
cause (e.g. the CUDA error). Nothing here syncs the host or reads tensor values, so the wrappers are
CUDA-graph safe; the data-dependent checks belong to the public ops (``ops/compaction.py``,
``ops/selection.py``), which call these wrappers for ``backend="cuda"``.

The C ABI is documented in ``csrc/include/kvpress_kernels/api.h`` and docs/CUDA.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from ._backend import cuda_ext_status

_INDEX_DTYPES = (torch.int32, torch.int64)
_MOVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int16, torch.int32)


def _ext():
    """The extension module, or a RuntimeError saying why it is unavailable."""
    mod, why = cuda_ext_status()
    if mod is None:
        raise RuntimeError(why)
    return mod


def _check_status(op: str, status: int, ext=None) -> None:
    """Raise ``RuntimeError("<op> failed: <message>")`` for a nonzero launcher status."""
    if status != 0:
        ext = ext if ext is not None else _ext()
        raise RuntimeError(f"{op} failed (status {status}): {ext.status_string(status)}")


def _on_cuda(name: str, t: torch.Tensor, device: Optional[torch.device]) -> torch.device:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the CUDA backend, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {t.device}")
    return t.device


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def compact_cuda(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                 kept_idx: torch.Tensor, pos_pages: Optional[torch.Tensor] = None) -> None:
    """In-place paged compaction on the GPU (one launch for all rows; no scratch, no host sync).

    Per row ``r`` with kept slots ``a_0 < ... < a_{n-1}`` (``kept_idx[r]``, then ``-1`` padding):
    the ``i``-th kept slot ``>= n`` moves into the ``i``-th non-kept slot ``< n`` (K, V and
    ``pos_pages`` together, raw bits), then ``lengths[r] = n``. Same contract as
    :func:`kvpress_kernels.ops.compaction.compact_ref`; no data checks here.

    Parameters
    ----------
    k_pages, v_pages : Tensor ``[num_pages, page_size, head_dim]``, 2- or 4-byte dtype, CUDA
        Page pools (mutated); unit last stride, other strides free; same dtype; head dims may differ.
    page_table : Tensor ``[R, max_pages]``, int32/int64
    lengths : Tensor ``[R]``, int32/int64 (mutated; only written)
    kept_idx : Tensor ``[R, K]``, int32/int64
    pos_pages : Tensor ``[num_pages, page_size]``, int32/int64, optional (mutated)
    """
    # Types and shapes first, devices last: each error names the first culprit.
    V.tensor("k_pages", k_pages, ndim=3, dtypes=_MOVE_DTYPES, last_contiguous=True)
    V.tensor("v_pages", v_pages, ndim=3, dtypes=(k_pages.dtype,), last_contiguous=True)
    num_pages, page_size, _ = k_pages.shape
    V.shape("v_pages", v_pages, [num_pages, page_size, None], "(num_pages and page_size of k_pages)")
    V.tensor("page_table", page_table, ndim=2, dtypes=_INDEX_DTYPES)
    rows = page_table.shape[0]
    V.tensor("lengths", lengths, ndim=1, dtypes=_INDEX_DTYPES)
    V.shape("lengths", lengths, [rows], "([R], R = page_table.shape[0])")
    V.tensor("kept_idx", kept_idx, ndim=2, dtypes=_INDEX_DTYPES)
    V.shape("kept_idx", kept_idx, [rows, None], "([R, K])")
    if pos_pages is not None:
        V.tensor("pos_pages", pos_pages, ndim=2, dtypes=_INDEX_DTYPES)
        V.shape("pos_pages", pos_pages, [num_pages, page_size], "([num_pages, page_size])")
    dev = _on_cuda("k_pages", k_pages, None)
    for name, t in (("v_pages", v_pages), ("page_table", page_table), ("lengths", lengths), ("kept_idx", kept_idx),
                    ("pos_pages", pos_pages)):
        if t is not None:
            _on_cuda(name, t, dev)
    ext = _ext()
    with torch.cuda.device(dev):
        status = ext.compact_paged(
            k_pages.data_ptr(), k_pages.stride(0), k_pages.stride(1), k_pages.shape[2],
            v_pages.data_ptr(), v_pages.stride(0), v_pages.stride(1), v_pages.shape[2],
            k_pages.element_size(), page_size,
            pos_pages.data_ptr() if pos_pages is not None else 0,
            pos_pages.stride(0) if pos_pages is not None else 0,
            pos_pages.stride(1) if pos_pages is not None else 0,
            pos_pages.element_size() if pos_pages is not None else 4,
            page_table.data_ptr(), page_table.stride(0), page_table.stride(1), page_table.element_size(),
            lengths.data_ptr(), lengths.stride(0), lengths.element_size(),
            kept_idx.data_ptr(), kept_idx.stride(0), kept_idx.stride(1), kept_idx.element_size(),
            rows, kept_idx.shape[1], _stream(dev))
    _check_status("compact_cuda", status, ext)


_SCORE_DTYPES = {torch.float32: "DTYPE_FLOAT32", torch.float16: "DTYPE_FLOAT16", torch.bfloat16: "DTYPE_BFLOAT16"}


def select_topk_cuda(scores: torch.Tensor, budgets: torch.Tensor, lengths: torch.Tensor, sink: int, recent: int,
                     protect: Optional[torch.Tensor], keep_mask_out: torch.Tensor, kept_idx_out: torch.Tensor, *,
                     smem_cache: bool = True) -> None:
    """Per-row top-k selection on the GPU (one block per row, all rows in one launch).

    Row ``r``: ``len = clamp(lengths[r], 0, N)``, ``budget = clamp(budgets[r], 0, len)``. Protected:
    ``j < len`` and (``j < sink`` or ``j >= len - recent`` or ``protect[r, j]``). Kept: every
    protected token plus the ``budget - #protected`` best unprotected ``j < len`` by score
    descending, ties to the lower ``j``, NaN below every number, ``-0.0 == +0.0``. Same contract as
    :func:`kvpress_kernels.ops.selection.select_topk_ref`.

    Parameters
    ----------
    scores : Tensor ``[R, N]``, float32/float16/bfloat16, CUDA (any strides)
    budgets, lengths : Tensor ``[R]``, int32/int64
    sink, recent : int >= 0
    protect : Tensor ``[R, N]``, bool, optional
    keep_mask_out : Tensor ``[R, N]``, bool (written: every ``j < N``)
    kept_idx_out : Tensor ``[R, K]``, int32/int64 (written: kept positions ascending, the first
        ``K`` of them, then ``-1``)
    smem_cache : bool
        Stage each row's keys in shared memory when they fit (default). ``False`` forces the path
        that re-reads global memory every pass (used by the tests; long rows take it anyway).
    """
    V.tensor("scores", scores, ndim=2, dtypes=tuple(_SCORE_DTYPES))
    R, N = scores.shape
    V.tensor("budgets", budgets, ndim=1, dtypes=_INDEX_DTYPES)
    V.shape("budgets", budgets, [R], "([R], R = scores.shape[0])")
    V.tensor("lengths", lengths, ndim=1, dtypes=_INDEX_DTYPES)
    V.shape("lengths", lengths, [R], "([R], R = scores.shape[0])")
    sink = V.integer("sink", sink, low=0)
    recent = V.integer("recent", recent, low=0)
    if protect is not None:
        V.tensor("protect", protect, ndim=2, dtypes=(torch.bool,))
        V.shape("protect", protect, [R, N], "(like scores)")
    V.tensor("keep_mask_out", keep_mask_out, ndim=2, dtypes=(torch.bool,))
    V.shape("keep_mask_out", keep_mask_out, [R, N], "(like scores)")
    V.tensor("kept_idx_out", kept_idx_out, ndim=2, dtypes=_INDEX_DTYPES)
    V.shape("kept_idx_out", kept_idx_out, [R, None], "([R, K])")
    dev = _on_cuda("scores", scores, None)
    for name, t in (("budgets", budgets), ("lengths", lengths), ("protect", protect),
                    ("keep_mask_out", keep_mask_out), ("kept_idx_out", kept_idx_out)):
        if t is not None:
            _on_cuda(name, t, dev)
    ext = _ext()
    flags = 0 if smem_cache else ext.SELECT_NO_SMEM_CACHE
    with torch.cuda.device(dev):
        status = ext.select_topk(
            scores.data_ptr(), scores.stride(0), scores.stride(1), getattr(ext, _SCORE_DTYPES[scores.dtype]),
            budgets.data_ptr(), budgets.stride(0), budgets.element_size(),
            lengths.data_ptr(), lengths.stride(0), lengths.element_size(),
            protect.data_ptr() if protect is not None else 0,
            protect.stride(0) if protect is not None else 0,
            protect.stride(1) if protect is not None else 0,
            min(sink, N), min(recent, N),
            keep_mask_out.data_ptr(), keep_mask_out.stride(0), keep_mask_out.stride(1),
            kept_idx_out.data_ptr(), kept_idx_out.stride(0), kept_idx_out.stride(1), kept_idx_out.element_size(),
            R, N, kept_idx_out.shape[1], flags, _stream(dev))
    _check_status("select_topk_cuda", status, ext)
