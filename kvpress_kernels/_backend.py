"""Backend selection shared by every op (DESIGN.md §3).

Each public op has up to three implementations with one contract:

- ``reference``: plain PyTorch, any device, fp32 accumulation; the CPU path and the test oracle.
- ``triton``: Triton kernels. On CUDA tensors they compile; on CPU tensors they run in the Triton
  interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before* ``kvpress_kernels``
  is imported (Triton reads it when a kernel is decorated).
- ``cuda``: the torch-free ``kvpress_kernels._C`` extension, for the ops that have one.

Choice, first match wins: the op's ``backend=`` keyword, then ``KVPRESS_KERNELS_BACKEND``, then the
device: CUDA tensors use ``cuda`` where it is built *and* enabled as default for that op (see
``CUDA_DEFAULT_OPS``), else ``triton``; CPU tensors use ``reference``.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_BACKEND = "KVPRESS_KERNELS_BACKEND"

# Ops whose CUDA kernel is the default on CUDA tensors. A CUDA kernel joins this set only after its
# GPU tests passed on a real GPU run recorded in docs/GPU_RUNS.md (issue 6's rule).
CUDA_DEFAULT_OPS: frozenset[str] = frozenset()


@lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(available, reason) for the Triton backend."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"triton is not importable: {exc!r}"
    return True, f"triton {triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if triton_interpret() else "")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def cuda_ext_status() -> tuple[object | None, str]:
    """(module or None, reason) for the compiled ``kvpress_kernels._C`` extension."""
    try:
        mod = importlib.import_module("kvpress_kernels._C")
    except Exception as exc:
        return None, f"kvpress_kernels._C is not built ({exc.__class__.__name__}: {exc}); " \
                     "install with nvcc on PATH and without KVPRESS_KERNELS_SKIP_CUDA"
    return mod, f"kvpress_kernels._C built (ABI {getattr(mod, 'ABI_VERSION', '?')}, " \
                f"{mod.device_count()} CUDA device(s) visible)"


def resolve_backend(op: str, backend: str | None, device: torch.device, *, has: tuple[str, ...] = BACKENDS) -> str:
    """Pick the implementation of ``op`` for tensors on ``device``.

    ``has`` lists the backends this op implements. Raises ``ValueError`` for an unknown or
    unavailable backend, naming why.
    """
    requested = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
        if requested not in has:
            raise ValueError(f"op {op!r} has no {requested!r} backend (it has {has})")
        _check_available(requested, device, op)
        return requested
    if device.type == "cuda":
        if "cuda" in has and op in CUDA_DEFAULT_OPS and cuda_ext_status()[0] is not None:
            return "cuda"
        if "triton" in has and triton_status()[0]:
            return "triton"
    return "reference"


def _check_available(backend: str, device: torch.device, op: str) -> None:
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise ValueError(f"backend='triton' for {op!r} is unavailable: {why}")
        if device.type == "cpu" and not triton_interpret():
            raise ValueError(
                f"backend='triton' for {op!r} on CPU tensors runs in the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing kvpress_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' for {op!r} needs CUDA or CPU tensors, got device {device}")
    elif backend == "cuda":
        mod, why = cuda_ext_status()
        if mod is None:
            raise ValueError(f"backend='cuda' for {op!r} is unavailable: {why}")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' for {op!r} needs CUDA tensors, got device {device}")


def debug_checks() -> bool:
    """Data-dependent input checks (they read device values, i.e. sync) run on CUDA tensors only
    when ``KVPRESS_KERNELS_DEBUG=1``; on CPU tensors they always run (no sync to avoid)."""
    return os.environ.get("KVPRESS_KERNELS_DEBUG", "0") not in ("", "0")


def wants_data_checks(t: torch.Tensor) -> bool:
    """Whether value-reading checks should run for inputs like ``t``: never while ``torch.compile``
    traces (they would break ``fullgraph``), always on CPU, on CUDA only in debug mode."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return t.device.type != "cuda" or debug_checks()


def info() -> dict[str, str]:
    """Which backends are available here and why not (``kvpress-kernels info``)."""
    t_ok, t_why = triton_status()
    c_mod, c_why = cuda_ext_status()
    return {
        "torch": f"{torch.__version__} (CUDA available: {torch.cuda.is_available()})",
        "reference": "available (plain PyTorch, every device)",
        "triton": ("available: " if t_ok else "unavailable: ") + t_why
        + ("" if torch.cuda.is_available() or triton_interpret() else
           "; CPU tensors need TRITON_INTERPRET=1 set before import"),
        "cuda": ("available: " if c_mod is not None else "unavailable: ") + c_why,
        "cuda default for ops": ", ".join(sorted(CUDA_DEFAULT_OPS)) or "none yet (Triton is the default on GPU)",
        "backend override": os.environ.get(ENV_BACKEND, "(unset)"),
    }
