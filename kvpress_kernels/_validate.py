"""Input checks shared by every public op and class.

Every failure is a ``TypeError`` (wrong Python/tensor type or dtype) or ``ValueError`` (wrong shape,
device, range, budget) whose message names the argument and shows what was received.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, dtypes: Iterable[torch.dtype] | None = None,
           device: torch.device | None = None, last_contiguous: bool = False) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank, dtype and device; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {list(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {t.device}")
    if last_contiguous and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {list(t.stride())}")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """Check ``t.shape`` against ``expected`` (``None`` matches any size)."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}{' ' + what if what else ''}, got {list(t.shape)}")


def integer(name: str, v, *, low: int | None = None, high: int | None = None) -> int:
    """Check a Python int (bools rejected) within [low, high] and within int64; return it.

    Every integer argument ends up in an int64 (a tensor element or a kernel argument), so a Python int
    outside ``[-2**63, 2**63)`` is a ``ValueError`` naming it, never an ``OverflowError`` from torch."""
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool:
            v = int(v)
        else:
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 [-2**63, 2**63 - 1], got {v}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def ratio(name: str, v, *, allow_zero: bool = False) -> float:
    """Check a ratio in (0, 1] (or [0, 1] with ``allow_zero``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (v == v) or v > 1.0 or v < 0.0 or (v == 0.0 and not allow_zero):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {v}")
    return v


def choice(name: str, v, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {v!r}")
    return v


def same_device(**tensors: torch.Tensor) -> torch.device:
    """All given tensors on one device; return it."""
    items = [(k, t) for k, t in tensors.items() if t is not None]
    dev = items[0][1].device
    for k, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{k} must be on device {dev} (like {items[0][0]}), got {t.device}")
    return dev


def paged_layout(k_pages, v_pages, page_table_, lengths) -> tuple[torch.device, int, int, int, list[int]]:
    """Checks shared by the ops that write the paged cache in place (append, compaction): pools
    ``[num_pages, page_size, head_dim]`` of one float dtype, a page table ``[..., max_pages]`` and
    contiguous ``lengths [...]`` with the same leading dims. Returns
    ``(device, num_pages, page_size, head_dim, leading dims)``."""
    tensor("k_pages", k_pages, ndim=3, dtypes=FLOAT_DTYPES, last_contiguous=True)
    dev = k_pages.device
    tensor("v_pages", v_pages, ndim=3, dtypes=(k_pages.dtype,), device=dev, last_contiguous=True)
    shape("v_pages", v_pages, list(k_pages.shape), "(same as k_pages)")
    num_pages, page_size, head_dim = k_pages.shape
    writable("k_pages", k_pages)
    writable("v_pages", v_pages)
    tensor("page_table", page_table_, dtypes=INDEX_DTYPES, device=dev)
    if page_table_.dim() < 1:
        raise ValueError(f"page_table must be [..., max_pages], got shape {list(page_table_.shape)}")
    lead = list(page_table_.shape[:-1])
    tensor("lengths", lengths, dtypes=INDEX_DTYPES, device=dev)
    shape("lengths", lengths, lead, "(the leading dims of page_table)")
    if not lengths.is_contiguous():
        raise ValueError("lengths must be contiguous (it is updated in place)")
    return dev, num_pages, page_size, head_dim, lead


def writable(name: str, t: torch.Tensor) -> None:
    """A tensor written in place must not be a broadcast (expanded) view: two of its elements would share
    one memory location, so writes would race (Triton) or fail inside torch (reference)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} is written in place, so it must not be an expanded (stride-0) view, "
                         f"got shape {list(t.shape)} with strides {list(t.stride())}")


def distinct_pages(table: torch.Tensor, lengths: torch.Tensor, page_size: int, name: str = "page_table") -> None:
    """Data check: the pages holding a row's first ``lengths`` tokens belong to that row only (DESIGN.md §4:
    a page belongs to exactly one row), else two rows' writes or moves would hit one slot."""
    max_pages = table.shape[-1]
    if max_pages == 0 or lengths.numel() == 0:
        return  # no page can hold a token
    used = (lengths.reshape(-1).long() + page_size - 1) // page_size
    live = torch.arange(max_pages, device=table.device).unsqueeze(0) < used.to(table.device).unsqueeze(1)
    vals = table.reshape(-1, max_pages)[live]
    if vals.numel() and torch.unique(vals).numel() != vals.numel():
        raise ValueError(f"{name} gives one page to two rows (or twice to one row); every page that holds "
                         "tokens must belong to exactly one row")


def page_table(name: str, table: torch.Tensor, num_pages: int, lengths: torch.Tensor | None, page_size: int) -> None:
    """Data checks of a page table: every page that holds a token of its row lies in
    ``[0, num_pages)``, lengths are in ``[0, max_pages * page_size]``. Reads values, so callers run
    it only where that costs no device sync (see ``_backend.wants_data_checks``)."""
    max_pages = table.shape[-1]
    if max_pages == 0 or table.numel() == 0:
        if lengths is not None and lengths.numel() and int(lengths.max()) > 0:
            raise ValueError(f"{name} has no pages but lengths reach {int(lengths.max())}")
        return
    if lengths is not None:
        lens = lengths.reshape(-1).to(torch.int64)
        if lens.numel() and int(lens.min()) < 0:
            raise ValueError(f"lengths must be >= 0, got min {int(lens.min())}")
        cap = max_pages * page_size
        if lens.numel() and int(lens.max()) > cap:
            raise ValueError(
                f"lengths must be <= max_pages * page_size = {cap} (capacity of {name}), got max {int(lens.max())}")
        used = (lens + page_size - 1) // page_size  # pages that hold tokens, per row
        cols = torch.arange(max_pages, device=table.device)
        live = cols.unsqueeze(0) < used.to(table.device).unsqueeze(1)
        vals = table.reshape(-1, max_pages)[live]
    else:
        vals = table.reshape(-1)
    if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= num_pages):
        raise ValueError(
            f"{name} holds page indices outside [0, {num_pages}) for tokens in use: "
            f"min {int(vals.min())}, max {int(vals.max())}")


def values_in(name: str, t: torch.Tensor, *, low: int | None = None, high: int | None = None,
              what: str = "") -> None:
    """Data check: every element of the integer tensor ``t`` lies in ``[low, high]``. Reads values, so
    callers run it only where that costs no device sync (see ``_backend.wants_data_checks``)."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if low is not None and lo < low:
        raise ValueError(f"{name} must be >= {low}{' ' + what if what else ''}, got min {lo}")
    if high is not None and hi > high:
        raise ValueError(f"{name} must be <= {high}{' ' + what if what else ''}, got max {hi}")


def generation_inputs(model, input_ids, attention_mask=None, shots=None, *, check_shots: bool = True) -> None:
    """Checks of the integrations' entry points (``generate``, ``model.generate`` inside ``compress``),
    made before the model runs, like the ops' checks: ``input_ids`` a ``[batch, tokens]`` int tensor on
    the model's device with ids in ``[0, vocab_size)``; ``attention_mask`` (optional) a ``[batch,
    tokens]`` int/bool tensor of 0/1 that leaves every sequence at least one token; ``shots`` valid for
    each prompt's unpadded length (:func:`kvpress_kernels.shots.normalize_batch_shots`). Reads values
    (one sync on CUDA: the integration is documented as not sync-free)."""
    from .shots import normalize_batch_shots

    tensor("input_ids", input_ids, dtypes=INDEX_DTYPES)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
    B, N = input_ids.shape
    if B == 0 or N == 0:
        raise ValueError(f"input_ids must hold at least one sequence of at least one token, got shape {list(input_ids.shape)}")
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if param is not None and input_ids.device != param.device:
        raise ValueError(f"input_ids must be on the model's device {param.device}, got {input_ids.device}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if input_ids.device.type != "meta":
        values_in("input_ids", input_ids, low=0, high=None if vocab is None else int(vocab) - 1,
                  what="(token ids of the model's vocabulary)")
    lengths = [N] * B
    if attention_mask is not None:
        tensor("attention_mask", attention_mask, dtypes=INDEX_DTYPES + (torch.bool, torch.int8, torch.uint8),
               device=input_ids.device)
        shape("attention_mask", attention_mask, [B, N], "(like input_ids)")
        if attention_mask.device.type != "meta":
            m = attention_mask.to(torch.int64)
            values_in("attention_mask", m, low=0, high=1, what="(1 = real token, 0 = padding)")
            per_row = m.sum(1)
            if B and int(per_row.min()) == 0:
                raise ValueError(f"attention_mask leaves sequence {int(per_row.argmin())} with no token")
            lengths = per_row.tolist()
    if check_shots and shots is not None:
        normalize_batch_shots(shots, lengths)
