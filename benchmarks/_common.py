"""Shared utilities of the benchmark suite (one script per op, plus the end-to-end one).

Contract of a benchmark script ``benchmarks/bench_<name>.py`` (``from _common import BenchContext, main_for``):

- ``run(ctx: BenchContext) -> list[dict]`` builds its inputs for ``ctx.device`` (shapes chosen with
  ``ctx.quick`` / ``ctx.is_gpu``), and calls :meth:`BenchContext.measure` once per case with a dict of
  providers ``name -> zero-argument callable``, or ``name -> str`` (why it is not measured here). It
  returns the rows ``measure`` gave back.
- ``if __name__ == "__main__": main_for("<name>", run)`` so the script also runs alone:
  ``python benchmarks/bench_<name>.py [--quick] [--out DIR] [--device cpu|cuda]``.

``kvpress-kernels bench`` imports every script, runs them in one process (one measurement of the
copy bandwidth, one metadata block) and writes ``bench.json`` / ``bench.csv`` / PNG plots.

Measurement rules (STYLE.md "Benchmarks"):

- inputs are built outside the timed region; a provider callable only launches the work;
- GPU: ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before every run, median and
  20/80 % quantiles); CPU: wall clock, median and quantiles of repeated calls after one warm-up;
- ``floor_bytes``: the bytes an ideal implementation must move (read + write), from the op's
  formula; ``gbps = floor_bytes / median``; ``pct_copy_bw`` compares that with the device copy
  bandwidth measured once per process (``dst.copy_(src)``, read + write counted);
- peak extra memory: GPU ``torch.cuda.max_memory_allocated`` over one call minus what was allocated
  before it; CPU an estimate, the peak of live tensor storages created by the call as seen by a
  ``TorchDispatchMode`` (it sees plain PyTorch code, not allocations inside a compiled or custom op);
- ratios: ``x_vs_<peer> = peer_median / this_median`` (> 1: this provider is faster than that peer).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:      # run from a source checkout without `pip install -e .`
    sys.path.append(str(REPO_ROOT))

# Order in which providers appear in tables and plots.
PROVIDER_ORDER = ("reference", "compiled", "triton", "cuda", "kvpress", "torch")

# Order in which providers are *measured*: our kernels and the peers first, so that a time budget (or
# a killed run) loses the slow reference / compile rows first.
MEASURE_ORDER = ("triton", "cuda", "kvpress", "torch", "reference", "compiled")

TRITON_CPU_NOTE = "on CPU Triton runs in its interpreter, which is not a speed measurement"


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _AllocTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages created (and still alive) during the mode, CPU estimate."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owned: dict[int, list] = {}     # storage data_ptr -> [nbytes, number of tracked tensors]

    def _release(self, ptr: int) -> None:
        entry = self._owned.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._owned[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    inputs.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        for t in outs:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0:
                continue
            if ptr in self._owned:
                self._owned[ptr][1] += 1
            elif ptr in inputs:
                continue          # a view of, or an in-place write into, memory that existed before
            else:
                self._owned[ptr] = [st.nbytes(), 1]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr)
        return out


class BenchContext:
    """Everything the benchmark scripts share in one process: device, mode, timing, metadata."""

    def __init__(self, device: Optional[str] = None, *, quick: bool = False, compile: Optional[bool] = None,
                 budget_s: Optional[float] = None, progress: bool = True, verbose: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.is_gpu = self.device.type == "cuda"
        self.quick = quick
        # torch.compile(reference) only in full runs: compiling takes tens of seconds (inductor's C++
        # builds on CPU, Triton builds on GPU), which a smoke run cannot afford.
        self.compile = (not quick) if compile is None else compile
        self.budget_s = budget_s
        self.t_start = time.perf_counter()
        self.progress = progress
        self.verbose = verbose
        self._copy_bw: Optional[float] = None
        self._meta: Optional[dict] = None

    # ---------------------------------------------------------------- metadata
    @property
    def meta(self) -> dict:
        if self._meta is None:
            try:
                import triton
                triton_v = triton.__version__
            except Exception:
                triton_v = "not installed"
            try:
                import kvpress  # noqa: F401
                from importlib.metadata import version
                kvpress_v = version("kvpress")
            except Exception:
                kvpress_v = "not installed"
            from kvpress_kernels._backend import cuda_ext_status
            self._meta = {
                "device": _device_name(self.device),
                "device_type": self.device.type,
                "torch": torch.__version__,
                "cuda": torch.version.cuda or "none",
                "triton": triton_v,
                "kvpress": kvpress_v,
                "cuda_ext": "built" if cuda_ext_status()[0] is not None else "not built",
                "commit": _git_commit(),
                "python": platform.python_version(),
                "quick": self.quick,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        return self._meta

    # ---------------------------------------------------------------- providers
    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t_start > self.budget_s

    def triton_ok(self) -> tuple[bool, str]:
        if not self.is_gpu:
            return False, TRITON_CPU_NOTE
        from kvpress_kernels._backend import triton_status
        return triton_status()

    def cuda_ok(self) -> tuple[bool, str]:
        from kvpress_kernels._backend import cuda_ext_status
        if not self.is_gpu:
            return False, "the CUDA extension needs CUDA tensors"
        mod, why = cuda_ext_status()
        return mod is not None, why

    def kvpress_ok(self) -> tuple[bool, str]:
        try:
            import kvpress  # noqa: F401
            return True, ""
        except Exception as exc:
            return False, f"kvpress not importable: {exc.__class__.__name__}"

    def compiled(self, fn: Callable, **kwargs) -> Optional[Callable]:
        """``torch.compile(fn)`` when this context compiles, else ``None``."""
        if not self.compile:
            return None
        return torch.compile(fn, **kwargs)

    # ---------------------------------------------------------------- measurements
    def sync(self) -> None:
        if self.is_gpu:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> Timing:
        """Median and 20/80 % quantiles of one call of ``fn`` in milliseconds."""
        if self.is_gpu:
            import triton.testing
            warmup, rep = (10, 40) if self.quick else (25, 100)
            med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            return Timing(float(med), float(p20), float(p80), -1)
        fn()                                            # warm-up (first-call costs, allocator)
        max_reps, max_s = (5, 0.5) if self.quick else (25, 3.0)
        times: list[float] = []
        t_end = time.perf_counter() + max_s
        while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
        return Timing(statistics.median(times), q[1], q[7], len(times))

    def peak_extra_bytes(self, fn: Callable[[], object]) -> Optional[int]:
        """Peak memory allocated by one call of ``fn`` beyond what existed before it."""
        if self.is_gpu:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return int(peak)
        tracker = _AllocTracker()
        with tracker:
            out = fn()
        del out
        return int(tracker.peak)

    def copy_bandwidth_gbs(self) -> float:
        """Device copy bandwidth (read + write bytes per second of ``dst.copy_(src)``), measured once."""
        if self._copy_bw is None:
            nbytes = (1 << 30) if self.is_gpu else (64 << 20 if self.quick else 256 << 20)
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).uniform_()
            dst = torch.empty_like(src)
            t = self.time(lambda: dst.copy_(src))
            self._copy_bw = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
            del src, dst
            if self.is_gpu:
                torch.cuda.empty_cache()
        return self._copy_bw

    def measure(self, op: str, case: dict, providers: dict[str, object], *, floor_bytes: Optional[float] = None,
                floor_note: str = "", check: Optional[Callable[[str, object], None]] = None) -> list[dict]:
        """Time every provider of one case; return one row per provider (skipped ones included).

        ``providers`` maps a provider name to a zero-argument callable, or to a string saying why it is
        not measured here. ``case`` holds the shape parameters (they become columns). ``check``, if
        given, is called once with (provider, first output) before timing — a wrong answer fails loudly
        instead of producing a fast number.
        """
        bw = self.copy_bandwidth_gbs()
        rows: list[dict] = []
        def measure_rank(p):
            base = p.split("+", 1)[0]
            return (MEASURE_ORDER.index(base) if base in MEASURE_ORDER else 99, p)

        for name in sorted(providers, key=measure_rank):
            fn = providers[name]
            row = {"op": op, **case, "case": " ".join(f"{k}={v}" for k, v in list(case.items())[:3]),
                   "case_keys": ",".join(case), "provider": name, "status": "ok", "note": "",
                   "median_ms": math.nan, "p20_ms": math.nan, "p80_ms": math.nan, "reps": 0,
                   "floor_bytes": floor_bytes if floor_bytes is not None else math.nan,
                   "floor_ms": (floor_bytes / (bw * 1e9) * 1e3) if floor_bytes else math.nan,
                   "gbps": math.nan, "pct_copy_bw": math.nan, "copy_bw_gbps": bw,
                   "peak_extra_bytes": math.nan}
            if floor_note:
                row["floor_note"] = floor_note
            if not callable(fn):
                row.update(status="skipped", note=str(fn or "not available"))
                rows.append(row)
                continue
            if self.over_budget():
                row.update(status="skipped", note=f"time budget of {self.budget_s:.0f} s spent")
                rows.append(row)
                continue
            try:
                out = fn()
                self.sync()
                if check is not None:
                    check(name, out)
                del out
                t = self.time(fn)
                peak = self.peak_extra_bytes(fn)
            except Exception as exc:  # one failing provider must not sink the whole run
                msg = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:300]
                if isinstance(exc, ValueError) and "backend (it has" in msg:
                    row.update(status="skipped", note=f"op has no such backend ({msg[12:120]})")
                    rows.append(row)
                    continue
                row.update(status="error", note=msg)
                rows.append(row)
                if self.verbose:
                    print(f"  [{op}] {name} failed: {msg}", file=sys.stderr)
                continue
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                       peak_extra_bytes=peak)
            if floor_bytes:
                gbps = floor_bytes / (t.median_ms * 1e-3) / 1e9
                row.update(gbps=gbps, pct_copy_bw=100.0 * gbps / bw)
            rows.append(row)
        rows.sort(key=lambda r: (PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER else 99,
                                 r["provider"]))
        ok = {r["provider"]: r["median_ms"] for r in rows if r["status"] == "ok"}
        for r in rows:
            for peer, peer_ms in ok.items():
                if peer != r["provider"]:
                    r[f"x_vs_{peer}"] = (peer_ms / r["median_ms"]) if r["status"] == "ok" else math.nan
        return rows


# -------------------------------------------------------------------- inputs
def random_page_table(rows: int, pages_per_row: int, *, device, generator: Optional[torch.Generator] = None,
                      extra_pages: int = 0) -> tuple[torch.Tensor, int]:
    """A page table ``[rows, pages_per_row]`` (int32) over a shuffled pool, as a long-running paged
    cache would have it (pages of a row are not contiguous in memory). Returns (table, num_pages)."""
    num_pages = rows * pages_per_row + extra_pages
    perm = torch.randperm(num_pages, generator=generator)[: rows * pages_per_row]
    return perm.view(rows, pages_per_row).to(torch.int32).to(device), num_pages


def pick_sizes(ctx: BenchContext, *, gpu: Iterable[int], gpu_quick: Iterable[int], cpu: Iterable[int],
               cpu_quick: Iterable[int]) -> list[int]:
    if ctx.is_gpu:
        return list(gpu_quick if ctx.quick else gpu)
    return list(cpu_quick if ctx.quick else cpu)


def free_memory(ctx: BenchContext) -> None:
    import gc
    gc.collect()
    if ctx.is_gpu:
        torch.cuda.empty_cache()


# -------------------------------------------------------------------- output
def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_results(rows: list[dict], out_dir: Path, meta: dict, *, stem: str = "bench") -> list[Path]:
    """``<stem>.json`` (metadata + rows) and ``<stem>.csv`` (one row per measurement, metadata repeated
    in every row so a CSV line stands on its own). Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    json_path.write_text(json.dumps({"meta": meta, "rows": clean}, indent=1))
    meta_cols = ["device", "torch", "triton", "commit"]
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + meta_cols)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: _csv_value(r.get(k, "")) for k in cols}, **{k: meta.get(k, "") for k in meta_cols}})
    return [json_path, csv_path]


def size_key(row: dict) -> Optional[str]:
    for k in ("tokens", "N", "n_tokens", "cache_tokens"):
        if k in row:
            return k
    return None


def plot_results(rows: list[dict], out_dir: Path, meta: dict) -> list[Path]:
    """One PNG per op: median time against the size column, one line per provider (log-log); the
    byte floor at the measured copy bandwidth drawn dashed. Returns [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    paths = []
    by_op: dict[str, list[dict]] = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    for op, op_rows in by_op.items():
        key = size_key(op_rows[0])
        if key is None:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in op_rows)]
        provs += sorted({r["provider"] for r in op_rows} - set(provs))
        # string case parameters that vary within the op (e.g. scoring's mode and lse) split the lines;
        # numeric ones (head counts, flops) follow from the size or are fixed
        keys = [k for k in (op_rows[0].get("case_keys") or "").split(",") if k and k != key]
        varying = [k for k in keys if isinstance(op_rows[0].get(k), str) and len({r.get(k) for r in op_rows}) > 1]

        def variant(r):
            return " ".join(f"{k}={r.get(k)}" for k in varying)

        for p in provs:
            for v in sorted({variant(r) for r in op_rows if r["provider"] == p}):
                pts = sorted((r[key], r["median_ms"]) for r in op_rows
                             if r["provider"] == p and variant(r) == v and r["status"] == "ok")
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} {v}".strip())
        for i, v in enumerate(sorted({variant(r) for r in op_rows})):
            floor = sorted({(r[key], r["floor_ms"]) for r in op_rows if variant(r) == v and
                            isinstance(r.get("floor_ms"), float) and not math.isnan(r["floor_ms"])})
            if floor:
                ax.plot([x for x, _ in floor], [y for _, y in floor], "k--", lw=1,
                        label="byte floor @ copy BW" if i == 0 else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{op} — {meta.get('device', '')[:60]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"bench_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def format_table(rows: list[dict]) -> str:
    """A compact text table of the rows (what the CLI prints)."""
    lines = []
    header = f"{'op':<16} {'case':<36} {'provider':<12} {'median ms':>10} {'p20-p80 ms':>17} {'GB/s':>8} " \
             f"{'%copyBW':>7} {'peak extra':>11}  vs peers"
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        case = r.get("case", "")
        if r["status"] != "ok":
            lines.append(f"{r['op']:<16} {case[:36]:<36} {r['provider']:<12} {r['status']}: {r['note'][:70]}")
            continue
        peers = " ".join(f"{k[5:]}:{v:.2f}x" for k, v in r.items()
                         if k.startswith("x_vs_") and isinstance(v, float) and not math.isnan(v))
        gb = f"{r['gbps']:.1f}" if not math.isnan(r["gbps"]) else "-"
        pct = f"{r['pct_copy_bw']:.0f}%" if not math.isnan(r["pct_copy_bw"]) else "-"
        pk = r["peak_extra_bytes"]
        pk = fmt_bytes(pk) if isinstance(pk, (int, float)) and not math.isnan(pk) else "-"
        lines.append(f"{r['op']:<16} {case[:36]:<36} {r['provider']:<12} {r['median_ms']:>10.3f} "
                     f"{r['p20_ms']:>8.3f}-{r['p80_ms']:<8.3f} {gb:>8} {pct:>7} {pk:>11}  {peers}")
    return "\n".join(lines)


def main_for(name: str, run: Callable[[BenchContext], list[dict]], argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry of one benchmark script."""
    ap = argparse.ArgumentParser(description=f"kvpress-kernels benchmark: {name}")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=None, help="directory for bench_<name>.json/.csv/.png")
    args = ap.parse_args(argv)
    ctx = BenchContext(args.device, quick=args.quick)
    rows = run(ctx)
    print(format_table(rows))
    if args.out:
        paths = write_results(rows, Path(args.out), ctx.meta, stem=f"bench_{name}")
        paths += plot_results(rows, Path(args.out), ctx.meta)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def make_paged_cache(ctx: BenchContext, *, layers: int, batch: int, kv_heads: int, tokens: int, head_dim: int,
                     dtype: torch.dtype, page_size: int = 16, extra_tokens: int = 0, seed: int = 0):
    """A filled paged cache with one pool shared by all layers (like ``PagedKVCache``).

    Returns ``(k_pages, v_pages, page_table [layers, batch, kv_heads, max_pages] int32,
    lengths [layers, batch, kv_heads] int32)``; every row holds ``tokens`` keys and owns pages for
    ``tokens + extra_tokens``. Pages of a row are scattered over the pool (shuffled page ids).
    """
    g = torch.Generator().manual_seed(seed)
    rows = layers * batch * kv_heads
    pages_per_row = -(-(tokens + extra_tokens) // page_size)
    table, num_pages = random_page_table(rows, pages_per_row, device=ctx.device, generator=g)
    k_pages = torch.randn(num_pages, page_size, head_dim, dtype=dtype, device=ctx.device)
    v_pages = torch.randn(num_pages, page_size, head_dim, dtype=dtype, device=ctx.device)
    lengths = torch.full((layers, batch, kv_heads), tokens, dtype=torch.int32, device=ctx.device)
    return k_pages, v_pages, table.view(layers, batch, kv_heads, pages_per_row), lengths


def random_kept_idx(rows: int, tokens: int, keep: int, *, device, protect_recent: int = 0,
                    seed: int = 0) -> torch.Tensor:
    """``[rows, keep]`` int32, ascending: a random ``keep``-subset of ``range(tokens)`` per row that
    always holds the last ``protect_recent`` slots (SnapKV's window), as a selection would return."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, tokens, generator=g)
    if protect_recent:
        scores[:, tokens - protect_recent:] = 2.0
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return idx.to(torch.int32).to(device)


def moved_tokens(kept_idx: torch.Tensor) -> int:
    """Tokens in-place compaction moves: kept slots at or beyond the new length (valid entries only)."""
    valid = kept_idx >= 0
    n = valid.sum(-1, keepdim=True)
    return int((valid & (kept_idx >= n)).sum())


def compile_size(ctx: BenchContext, sizes: list[int]) -> int:
    """The one size per op at which ``torch.compile(reference)`` is measured: compiling costs tens of
    seconds per shape, more than the whole rest of a GPU run (32k tokens on GPU, the middle size else)."""
    return 32768 if ctx.is_gpu and 32768 in sizes else sizes[len(sizes) // 2]


def op_providers(ctx: BenchContext, ref_fn: Callable, public_fn: Callable, args: tuple, *, kwargs: Optional[dict] = None,
                 ref_kwargs: Optional[dict] = None, backends: Iterable[str] = ("triton", "cuda"),
                 before: Optional[Callable[[], object]] = None, compile: bool = True) -> dict[str, object]:
    """The standard providers of one op: ``reference`` (``ref_fn`` eager), ``compiled``
    (``torch.compile(ref_fn)``, only when ``compile``), and the public op forced to each of
    ``backends``. ``before`` runs first inside every timed call (e.g. restoring ``lengths`` that the
    op advances)."""
    kwargs = kwargs or {}
    ref_kwargs = kwargs if ref_kwargs is None else ref_kwargs
    pre = before or (lambda: None)

    def call(fn, **extra):
        def f():
            pre()
            return fn(*args, **ref_kwargs if fn is not public_fn else {**kwargs, **extra})
        return f

    providers: dict[str, object] = {"reference": call(ref_fn)}
    cref = ctx.compiled(ref_fn) if compile else None
    providers["compiled"] = call(cref) if cref is not None else \
        ("torch.compile runs only in full runs (not --quick)" if compile else
         "torch.compile is measured at one size per op (compiling costs more than the run)")
    for b in backends:
        ok, why = ctx.triton_ok() if b == "triton" else ctx.cuda_ok()
        providers[b] = call(public_fn, backend=b) if ok else why
    return providers
