"""Compile check: every Triton kernel, every launch configuration a GPU launcher can choose,
compiled ahead of time for sm_80 and sm_90 by Triton's own compiler on a machine without a GPU
(DESIGN.md §9, static checks).

How a variant is produced
-------------------------
Nothing here restates a launcher's tile choice. Each *case* below calls a real launcher (the
``_<op>_triton`` function of an op module) with small CPU tensors of the shape it describes, under
:func:`kvpress_kernels.ops._tiles.force_gpu_tiles` (so the launcher sizes tiles, warps and splits as
on a GPU) while every ``@triton.jit`` kernel's launch is *captured* instead of run. A captured launch
is turned into the compiler's input by Triton's own binder, the same code the JIT runs on a real
launch: argument types, the ``== 1`` and ``% 16`` integer specialisations, pointer alignment,
constexprs, ``num_warps``/``num_stages``. The variant is then compiled with ``triton.compile`` for
``GPUTarget("cuda", cc, 32)``; identical variants (fp16 and bf16 copies move the same integer bits,
say) are compiled once.

What is read from the result
----------------------------
- ptxas ``-v`` (run on the PTX with Triton's own ptxas): registers per thread, spill stores/loads,
  stack frame; Triton's metadata: shared memory per program;
- the PTX: every ``ld.global`` / ``st.global`` / ``cp.async`` with its width in bytes, attributed
  through its ``.loc`` line to the ``tl.load`` / ``tl.store`` in the kernel source, and so to the
  array it reads (K/V pages, scores, ...).

It fails on
-----------
- a compile error, or a kernel found in the source that no case launches (a new kernel must be
  given a case here: discovery scans every module of the package for ``@triton.jit``);
- any spill (ptxas spill stores or loads > 0);
- a K/V access narrower than 16 bytes in a copy path (append, compaction, the K tiles of scoring,
  the K/V tiles of decode attention) for fp16/bf16 at ``D % 8 == 0``;
- more than 128 registers per thread in a memory-bound kernel (append, compaction, pooling,
  segment reduce, selection).

Run: ``kvpress-kernels compile-check`` (or ``python -m kvpress_kernels.compile_check``; ``make
compile-check``, and ``make compile-check-triton36`` for Triton 3.6 in a side environment; CI runs
both). ``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels. ``--cases REGEX`` /
``--kernel REGEX`` / ``--arch`` narrow a run while iterating on one kernel; ``--doc`` writes the
generated table (docs/COMPILE_CHECK.md), ``--json`` the raw results. Results of ptxas are cached by
PTX hash under ``~/.cache/kvpress_kernels/compile_check`` and Triton caches its compiled kernels by
source hash, so a rerun on unchanged kernels takes seconds.

Coverage: every (dtype, head dim) in fp16/bf16/fp32 x 64/96/128/256 with every block size, warp count
and split choice its launcher makes for it; feature flags (counts, positions, causal, probabilities,
paged, head reduction, ...) crossed in full at D = 128 and at their heaviest setting elsewhere;
page size 16; integer arguments that the JIT specialises (``== 1``, ``% 16``) at a decode-like and a
prefill-like value. A configuration outside these (another page size, say) compiles on first use.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 default, without its warning

PKG_DIR = Path(__file__).resolve().parent
ARCHS = (80, 90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 96, 128, 256)
MAX_REGS_MEMORY_BOUND = 128
MIN_KV_BYTES = 16


# --------------------------------------------------------------------------------------------------
# What each kernel is (roles), and the cases that launch it
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Role:
    kv: tuple = ()            # pointer arguments whose accesses are K/V copies / tiles: 16 B rule
    data: tuple = ()          # other K/V/score data arrays whose access widths are reported
    memory_bound: bool = False  # <= 128 registers per thread


ROLES = {
    "_append_kernel": Role(kv=("k_new", "v_new", "k_pages", "v_pages"), memory_bound=True),
    "_advance_lengths_kernel": Role(memory_bound=True),
    "_compact_kernel": Role(kv=("k_pages", "v_pages"), data=("pos_pages",), memory_bound=True),
    "_decode_split_kernel": Role(kv=("k_pages", "v_pages"), data=("q", "logits", "mid_acc")),
    "_decode_reduce_kernel": Role(data=("mid_acc", "out")),
    "_decode_probs_kernel": Role(data=("logits", "probs"), memory_bound=True),
    "_lse_partial_kernel": Role(kv=("k_ptr",), data=("q",)),
    "_mass_kernel": Role(kv=("k_ptr",), data=("q", "out")),
    "_pool_kernel": Role(data=("src", "dst"), memory_bound=True),
    "_segment_reduce_kernel": Role(data=("scores", "out"), memory_bound=True),
    "_select_topk_kernel": Role(data=("scores", "keep_mask"), memory_bound=True),
    "_select_segments_kernel": Role(data=("order", "sizes"), memory_bound=True),
    "_head_budget_kernel": Role(data=("scores", "keep_mask"), memory_bound=True),
    "_block_compact_kernel": Role(kv=("k_cache", "v_cache"), memory_bound=True),
    "_block_gather_kernel": Role(kv=("k_cache", "v_cache"), memory_bound=True),
}


@dataclass
class Case:
    op: str
    label: str
    dtype: Optional[str]
    head_dim: Optional[int]
    run: Callable[[], None]


def _paged(dtype, D, rows=(2, 2), page_size=16, max_pages=8, num_pages=None):
    num_pages = num_pages or rows[0] * rows[1] * max_pages
    kp = torch.zeros(num_pages, page_size, D, dtype=dtype)
    vp = torch.zeros_like(kp)
    table = torch.arange(rows[0] * rows[1] * max_pages, dtype=torch.int32).view(*rows, max_pages)
    lens = torch.full(rows, page_size * max_pages // 2, dtype=torch.int32)
    return kp, vp, table, lens


def _cases() -> list[Case]:
    from .ops import append as A
    from .ops import block_compaction as BC
    from .ops import compaction as C
    from .ops import head_budget as HB
    from .ops import decode_attention as DA
    from .ops import scoring as S
    from .ops import segments as SG
    from .ops import selection as SL

    cases: list[Case] = []

    def add(op, label, dt, D, fn):
        cases.append(Case(op, label, dt, D, fn))

    # Tile choices depend on dtype and head dim: every (dtype, D) is compiled. Feature flags are
    # crossed in full at the D the flags interact with most (D = 128, the common head dim) and taken at
    # their heaviest setting elsewhere, which keeps the check to a few minutes on two cores.
    for (dt, dtype), D in itertools.product(DTYPES.items(), HEAD_DIMS):
        full = D == 128
        # append: prefill-sized (T not 1 nor a multiple of 16) and decode (T = 1, specialised) appends,
        # with and without counts / the position side pool.
        for T, counts, pos in itertools.product((37, 1), (True, False), (True, False)):
            if not full and not (counts and pos):
                continue
            def run(dtype=dtype, D=D, T=T, counts=counts, pos=pos):
                kp, vp, table, lens = _paged(dtype, D)
                kn = torch.zeros(2, 2, T, D, dtype=dtype)
                cnt = torch.full((2, 2), T, dtype=torch.int32) if counts else None
                pp = torch.zeros(kp.shape[:2], dtype=torch.int32) if pos else None
                pn = torch.zeros(2, 2, T, dtype=torch.int32) if pos else None
                A._append_triton(kp, vp, table, lens, kn, kn.clone(), cnt, pp, pn)
            add("append", f"T={T} counts={int(counts)} pos={int(pos)}", dt, D, run)
        # compaction: a short and a long kept list (LOG_K is a constexpr), with / without positions.
        for K, pos in itertools.product((3000, 50), (True, False)):
            if not full and K == 50:
                continue
            def run(dtype=dtype, D=D, K=K, pos=pos):
                kp, vp, table, lens = _paged(dtype, D, rows=(1, 1), max_pages=max(8, -(-2 * K // 16)))
                lens.fill_(2 * K)
                kept = torch.arange(K, dtype=torch.int32).view(1, 1, K)
                pp = torch.zeros(kp.shape[:2], dtype=torch.int32) if pos else None
                C._compact_triton(kp, vp, table, lens, kept, pp)
            add("compaction", f"K={K} pos={int(pos)}", dt, D, run)
        # decode attention: G*T = 4 (decode, GQA 4), 32 and 128 query rows (every BLOCK_M); causal; probs.
        for (G, T), causal, probs in itertools.product(((4, 1), (8, 4), (8, 16)), (True, False), (True, False)):
            if T == 1 and not causal:
                continue  # T = 1: causal changes nothing but the constexpr
            if not (causal and probs) and not (full and (G, T) == (8, 4)):
                continue
            def run(dtype=dtype, D=D, G=G, T=T, causal=causal, probs=probs):
                kp, vp, table, lens = _paged(dtype, D, rows=(2, 2))
                q = torch.zeros(2, 2 * G, T, D, dtype=dtype)
                DA._paged_decode_attention_triton(q, kp, vp, table, lens, D ** -0.5, causal, probs,
                                                  DA.default_num_splits(table.shape[-1] * kp.shape[1], 4, q.device))
            add("decode_attention", f"G={G} T={T} causal={int(causal)} probs={int(probs)}", dt, D, run)
        # scoring: SnapKV window (W = 32, G = 4: 128 rows), a short window (W = 8) and H2O (W = N,
        # causal); dense and paged; the head reductions (none / group sum / group max kernels).
        for (W, causal), paged, reduce in itertools.product(((32, False), (8, True), (256, True)), (False, True),
                                                            ("none", "group_sum", "group_max")):
            heavy = (W, causal, paged, reduce) in ((32, False, True, "none"), (8, True, False, "group_max"),
                                                   (256, True, True, "group_sum"))
            if not heavy and not (full and W == 32):
                continue
            def run(dtype=dtype, D=D, W=W, causal=causal, paged=paged, reduce=reduce):
                G, N = 4, 256
                q = torch.zeros(1, 2 * G, W, D, dtype=dtype)
                lens = torch.full((1, 2), N, dtype=torch.int32)
                if paged:
                    kp, _, table, _ = _paged(dtype, D, rows=(1, 2), max_pages=N // 16)
                    S._mass_triton(q, kp, table, lens, N, D ** -0.5, None, causal, reduce, None, 1, None)
                else:
                    k = torch.zeros(1, 2, N, D, dtype=dtype)
                    S._mass_triton(q, k, None, lens, N, D ** -0.5, None, causal, reduce, None, 1, None)
            add("scoring", f"W={W} causal={int(causal)} paged={int(paged)} reduce={reduce}", dt, D, run)
        # query_reduce="max" (KVzip's score: the reconstruction queries, W ~ N, causal, paged, group max)
        for W, paged in ((256, True), (32, False)):
            if not paged and not full:
                continue
            def run(dtype=dtype, D=D, W=W, paged=paged):
                G, N = 4, 256
                q = torch.zeros(1, 2 * G, W, D, dtype=dtype)
                lens = torch.full((1, 2), N, dtype=torch.int32)
                if paged:
                    kp, _, table, _ = _paged(dtype, D, rows=(1, 2), max_pages=N // 16)
                    S._mass_triton(q, kp, table, lens, N, D ** -0.5, None, True, "group_max", None, 1, None, "max")
                else:
                    k = torch.zeros(1, 2, N, D, dtype=dtype)
                    S._mass_triton(q, k, None, lens, N, D ** -0.5, None, True, "group_max", None, 1, None, "max")
            add("scoring", f"W={W} causal=1 paged={int(paged)} reduce=group_max query=max", dt, D, run)

    # Score-only kernels (fp32 scores in, no head dim): pooling, segment reduce, selection.
    for pool, end in itertools.product(("avg", "max"), (None, 100)):
        def run(pool=pool, end=end):
            S._pool_triton(torch.zeros(2, 4, 256), torch.full((2, 4), 200, dtype=torch.int32), pool, 7, end)
        add("scoring", f"pool={pool} end={end}", None, None, run)
    for dt, (spans, size), lengths, reduce in itertools.product(("fp32", "fp16"), ((False, 8), (False, 64),
                                                                                    (False, 512), (True, 0)),
                                                                (True, False), ("sum", "mean", "max")):
        if dt == "fp16" and not (size == 64 and lengths):
            continue  # the input dtype only changes the load: one chunked case per reduction
        def run(dt=dt, spans=spans, size=size, lengths=lengths, reduce=reduce):
            N = 1024
            x = torch.zeros(4, N, dtype=DTYPES[dt])
            lens = torch.full((4,), N, dtype=torch.int32) if lengths else None
            if spans:
                sp = torch.tensor([[0, 100], [100, 700], [700, 1000]], dtype=torch.int32)
                SG._segment_reduce_triton(x, sp, 0, 3, reduce, lens)
            else:
                SG._segment_reduce_triton(x, None, size, -(-N // size), reduce, lens)
        add("segments", f"{'spans' if spans else f'chunk={size}'} lengths={int(lengths)} reduce={reduce}", dt, None, run)
    # Selection: the three tile widths (256, 512, 1024) at 16-aligned rows, plus one unaligned row (1000).
    for dt, N, lengths, protect in itertools.product(("fp32", "fp16"), (256, 512, 4096, 1000), (True, False),
                                                     (True, False)):
        if (dt == "fp16" or N == 1000) and not (N in (512, 1000) and lengths and protect):
            continue
        def run(dt=dt, N=N, lengths=lengths, protect=protect):
            x = torch.zeros(4, N, dtype=DTYPES[dt])
            bud = torch.full((4,), N // 2, dtype=torch.int32)
            lens = torch.full((4,), N, dtype=torch.int32) if lengths else None
            prot = torch.zeros(4, N, dtype=torch.bool) if protect else None
            SL._select_topk_triton(x, bud, lens, 4, 16, prot, N // 2)
        add("selection", f"topk N={N} lengths={int(lengths)} protect={int(protect)}", dt, None, run)
    # AdaKV head-budget selection: every tile width (256 / 512 / 1024) and the flags, 8 kv heads.
    for N, lengths, protect in itertools.product((200, 512, 1000), (True, False), (True, False)):
        if N != 512 and not (lengths and protect):
            continue
        def run(N=N, lengths=lengths, protect=protect):
            H = 8
            x = torch.zeros(2, H, N)
            bud = torch.full((2,), H * N // 2, dtype=torch.int32)
            floor = torch.full((2,), N // 10, dtype=torch.int32)
            lens = torch.full((2, H), N, dtype=torch.int32) if lengths else None
            prot = torch.zeros(2, H, N, dtype=torch.bool) if protect else None
            HB._select_head_budget_triton(x, bud, floor, lens, 4, 16, prot, N)
        add("head_budget", f"N={N} lengths={int(lengths)} protect={int(protect)}", "fp32", None, run)
    # Engine-layout (vLLM blocks spanning all kv heads) compaction and gather: every dtype / head dim, the
    # NHD view of vLLM's FlashAttention [2, nb, bs, H, D] cache and its HND permutation, short / long K.
    for (dt, dtype), D, hnd, K in itertools.product(DTYPES.items(), HEAD_DIMS, (False, True), (3, 3000)):
        if D != 128 and (hnd or K == 3):
            continue
        def run(dtype=dtype, D=D, hnd=hnd, K=K):
            H, bs = 8, 16
            nb = -(-2 * K // bs) * 2
            kv = torch.zeros(2, nb, H, bs, D, dtype=dtype).transpose(2, 3) if hnd else \
                torch.zeros(2, nb, bs, H, D, dtype=dtype)
            table = torch.arange(nb // 2, dtype=torch.int32)
            kept = torch.arange(K, dtype=torch.int32).view(1, K).expand(H, K)
            BC._block_compact_triton(kv[0], kv[1], table, kept, 2 * K)
            dst = torch.arange(nb // 2, nb, dtype=torch.int32)
            BC._block_gather_triton(kv[0], kv[1], table, dst, kept)
        add("block_compaction", f"K={K} {'HND' if hnd else 'NHD'}", dt, D, run)
    for S_, protect, policy in itertools.product((12, 3000), (False, True), ("skip", "stop")):
        def run(S_=S_, protect=protect, policy=policy):
            sc = torch.zeros(4, S_)
            sizes = torch.ones(4, S_, dtype=torch.int32)
            bud = torch.full((4,), S_ // 2, dtype=torch.int32)
            SL._select_segments_triton(sc, sizes, bud, policy, torch.zeros(4, S_, dtype=torch.bool) if protect else None)
        add("selection", f"segments S={S_} protect={int(protect)} policy={policy}", "fp32", None, run)
    return cases


# --------------------------------------------------------------------------------------------------
# Discovery: every @triton.jit in the package's source
# --------------------------------------------------------------------------------------------------

def _jit_names_in_source(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if ast.unparse(target) in ("triton.jit", "jit"):
                    names.append(node.name)
    return names


def discover_kernels(pkg_dir: Path = PKG_DIR, package: str = "kvpress_kernels") -> tuple[dict, dict]:
    """``(kernels, helpers)``: name -> JITFunction for every ``@triton.jit`` function in the package.

    Helpers are the jit functions called from another jit function (inlined device functions, never
    launched); every other one is a kernel and needs a case."""
    import importlib

    from triton.runtime.jit import JITFunction

    found = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        if "@triton.jit" not in path.read_text() and "@jit" not in path.read_text():
            continue
        rel = path.relative_to(pkg_dir).with_suffix("")
        modname = ".".join((package, *rel.parts))
        if modname.endswith(".__init__"):
            modname = modname[: -len(".__init__")]
        names = _jit_names_in_source(path)
        if not names:
            continue
        mod = importlib.import_module(modname)
        for name in names:
            obj = getattr(mod, name, None)
            if not isinstance(obj, JITFunction):
                raise RuntimeError(f"{modname}.{name} is decorated with @triton.jit but is not a module-level "
                                   f"JITFunction (is TRITON_INTERPRET set? it must not be for the compile check)")
            found[name] = obj
    helpers = {}
    for name, fn in found.items():
        pattern = re.compile(rf"\b{re.escape(name)}\s*\(")
        if any(other is not fn and pattern.search(other.src) for other in found.values()):
            helpers[name] = fn
    kernels = {n: f for n, f in found.items() if n not in helpers}
    return kernels, helpers


# --------------------------------------------------------------------------------------------------
# Capture: drive the launchers, record the launches
# --------------------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str
    case: Case
    args: tuple
    kwargs: dict


def capture_launches(kernels: dict, cases: list[Case]) -> list[Launch]:
    from .ops._tiles import force_gpu_tiles

    launches: list[Launch] = []
    current: list = [None]

    def make(name):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(name, current[0], args, kwargs))
        return run

    saved = {n: fn.__dict__.get("run") for n, fn in kernels.items()}
    try:
        for n, fn in kernels.items():
            fn.run = make(n)
        with force_gpu_tiles():
            for case in cases:
                current[0] = case
                case.run()
    finally:
        for n, fn in kernels.items():
            if saved[n] is None:
                fn.__dict__.pop("run", None)
            else:
                fn.run = saved[n]
    return launches


def _specialize(fn, launch: Launch, cc: int):
    """Triton's own binder on the captured arguments: (signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options.__dict__


# --------------------------------------------------------------------------------------------------
# Compile one variant and read ptxas / PTX
# --------------------------------------------------------------------------------------------------

_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s")
_CP_ASYNC = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.c[ag]\.shared\.global(?:\.[A-Za-z0-9_:]+)*\s+\[[^\]]*\],\s*"
                       r"\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


def ptx_accesses(ptx: str) -> list[tuple[str, int, str, int]]:
    """Global memory instructions of a PTX listing: ``(op, bytes, file, line)`` with ``op`` "ld"/"st"
    (``cp.async`` global-to-shared copies count as loads) and the source line of the last ``.loc``."""
    lines = ptx.splitlines()
    files = {m.group(1): m.group(2) for m in map(_FILE.match, lines) if m}  # LLVM lists them at the end
    cur = ("", 0)
    out = []
    for line in lines:
        m = _LOC.match(line)
        if m:
            cur = (m.group(1), int(m.group(2)))
            continue
        m = _ACCESS.match(line)
        if m:
            mods = m.group(2).split(".")
            vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d", x)), 1)
            bits = next((int(x[1:]) for x in mods if re.fullmatch(r"[bfsu](8|16|32|64|128)", x)), 0)
            out.append((m.group(1), vec * bits // 8, files.get(cur[0], cur[0]), cur[1]))
            continue
        m = _CP_ASYNC.match(line)
        if m:
            out.append(("ld", int(m.group(1), 0), files.get(cur[0], cur[0]), cur[1]))
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    regs = _PTXAS_REGS.search(log)
    sp = _PTXAS_SPILL.search(log)
    return dict(regs=int(regs.group(1)) if regs else -1,
                stack=int(sp.group(1)) if sp else 0,
                spill_stores=int(sp.group(2)) if sp else 0,
                spill_loads=int(sp.group(3)) if sp else 0)


def _cache_dir() -> Path:
    d = Path(os.environ.get("KVPRESS_KERNELS_COMPILE_CACHE", Path.home() / ".cache" / "kvpress_kernels" / "compile_check"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_ptxas(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path if callable(get_ptxas) else get_ptxas()
    arch = sm_arch_from_capability(cc)
    key = hashlib.sha256((ptx + arch + str(ptxas)).encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-2000:]}")
    res = parse_ptxas(r.stderr)
    cached.write_text(json.dumps(res))
    return res


@dataclass
class SourceCalls:
    """tl.load / tl.store calls of one source file: line ranges and the names behind the pointer."""
    calls: list = field(default_factory=list)   # (first_line, last_line, op, frozenset(names))

    @classmethod
    def parse(cls, path: str) -> "SourceCalls":
        tree = ast.parse(Path(path).read_text())
        out = cls()
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            deps: dict[str, set] = {}
            for node in ast.walk(func):
                if isinstance(node, (ast.Assign, ast.AugAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                    for t in targets:
                        for tn in (n for n in ast.walk(t) if isinstance(n, ast.Name)):
                            deps.setdefault(tn.id, set()).update(names)
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("load", "store") and node.args):
                    names = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)}
                    todo, seen = list(names), set(names)
                    while todo:  # names the pointer expression was computed from
                        for d in deps.get(todo.pop(), ()):
                            if d not in seen:
                                seen.add(d)
                                todo.append(d)
                    op = "ld" if node.func.attr == "load" else "st"
                    out.calls.append((node.lineno, node.end_lineno, op, frozenset(seen)))
        return out

    def names_at(self, line: int, op: str) -> frozenset:
        """Names behind the innermost ``op`` call covering ``line``. The compiler may schedule a copy's
        load under the ``.loc`` of the store that follows it: a load found at a line with no load is
        given to the nearest load call ending at most 3 lines above."""
        best = None
        for lo, hi, o, names in self.calls:
            if o == op and lo <= line <= hi and (best is None or hi - lo < best[1] - best[0]):
                best = (lo, hi, names)
        if best is None:
            for lo, hi, o, names in self.calls:
                if o == op and line - 3 <= hi < line and (best is None or hi > best[1]):
                    best = (lo, hi, names)
        return best[2] if best else frozenset()


_SOURCE_CALLS: dict[str, SourceCalls] = {}


def _source_calls(path: str) -> SourceCalls:
    if path not in _SOURCE_CALLS:
        _SOURCE_CALLS[path] = SourceCalls.parse(path) if Path(path).exists() else SourceCalls()
    return _SOURCE_CALLS[path]


def access_widths(ptx: str, arrays: tuple) -> dict:
    """{array: {"ld": min bytes, "st": min bytes}} over the PTX accesses attributed to each array."""
    out: dict = {}
    for op, nbytes, path, line in ptx_accesses(ptx):
        names = _source_calls(path).names_at(line, op)
        for a in arrays:
            if a in names:
                slot = out.setdefault(a, {})
                slot[op] = min(slot.get(op, nbytes), nbytes)
    return out


def _compile_one(job: dict) -> dict:
    """Worker: compile one (kernel, arch) variant; returns its figures or its error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    res = dict(key=job["key"])
    try:
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32), options=job["options"])
        ptx = k.asm["ptx"]
        res.update(run_ptxas(ptx, job["cc"]))
        res["shared"] = int(getattr(k.metadata, "shared", 0))
        res["num_warps"] = int(getattr(k.metadata, "num_warps", 0))
        res["widths"] = access_widths(ptx, job["arrays"])
        res["ok"] = True
    except Exception as exc:  # a compile error is a result, not a crash of the check
        res["ok"] = False
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    res["seconds"] = round(time.time() - t0, 2)
    return res


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------

@dataclass
class Variant:
    kernel: str
    op: str
    cc: int
    dtype: Optional[str]
    head_dim: Optional[int]
    labels: list
    config: str
    result: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


def _config_text(constexprs: dict, options: dict, fn) -> str:
    names = [p.name for p in fn.params]
    parts = []
    for path, val in sorted(constexprs.items()):
        name = names[path[0]] if path and path[0] < len(names) else str(path)
        if name.isupper():  # block sizes and flags; specialised ints (== 1) are in the signature
            parts.append(f"{name}={int(val) if isinstance(val, bool) else val}")
    parts.append(f"w={options.get('num_warps')}")
    return " ".join(parts)


def judge(v: Variant, role: Role) -> list[str]:
    r = v.result
    if not r.get("ok"):
        return [f"compile error: {r.get('error')}"]
    problems = []
    if r["spill_stores"] or r["spill_loads"]:
        problems.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    if role.memory_bound and r["regs"] > MAX_REGS_MEMORY_BOUND:
        problems.append(f"{r['regs']} registers > {MAX_REGS_MEMORY_BOUND} in a memory-bound kernel")
    if role.kv and v.dtype in ("fp16", "bf16") and v.head_dim is not None and v.head_dim % 8 == 0:
        for a in role.kv:
            for op, nbytes in r["widths"].get(a, {}).items():
                if nbytes < MIN_KV_BYTES:
                    problems.append(f"{a} {op} {nbytes} B < {MIN_KV_BYTES} B")
    return problems


def build_variants(kernels: dict, cases: list[Case], archs=ARCHS) -> tuple[list[Variant], list[dict], list[str]]:
    """Capture the launches of every case and turn them into deduplicated compile jobs."""
    launches = capture_launches(kernels, cases)
    launched = {l.kernel for l in launches}
    missing = sorted(set(kernels) - launched)
    variants: dict = {}
    jobs: list[dict] = []
    for l in launches:
        fn = kernels[l.kernel]
        role = ROLES.get(l.kernel, Role())
        for cc in archs:
            sig, cex, attrs, opts = _specialize(fn, l, cc)
            key = hashlib.sha256(repr((l.kernel, cc, sorted(sig.items()), sorted(cex.items()), sorted(attrs.items()),
                                       sorted((k, str(v)) for k, v in opts.items()))).encode()).hexdigest()[:16]
            # fp16 and bf16 variants with identical compiler input are one variant (copies move bits);
            # the rules see the dtype of the case, so keep them apart when the dtype class differs.
            vkey = (key, l.case.dtype if l.case.dtype != "bf16" else "fp16", l.case.head_dim)
            if vkey in variants:
                variants[vkey].labels.append(f"{l.case.dtype} {l.case.label}")
                continue
            variants[vkey] = Variant(l.kernel, l.case.op, cc, l.case.dtype, l.case.head_dim,
                                     [f"{l.case.dtype} {l.case.label}"], _config_text(cex, opts, fn))
            variants[vkey].result = {"key": key}
            if not any(j["key"] == key for j in jobs):
                jobs.append(dict(key=key, module=fn.module, kernel=l.kernel, cc=cc, signature=sig, constexprs=cex,
                                 attrs=attrs, options=opts, arrays=tuple(role.kv) + tuple(role.data)))
    return list(variants.values()), jobs, missing


def run_check(jobs_n: Optional[int] = None, kernel_filter: Optional[str] = None, archs=ARCHS,
              progress: bool = True, case_filter: Optional[str] = None, budget_s: Optional[float] = None) -> dict:
    import triton

    t0 = time.time()
    kernels, helpers = discover_kernels()
    cases = _cases()
    if case_filter:  # a partial run (iterating on one kernel): kernels it does not launch are not "missing"
        cases = [c for c in cases if re.search(case_filter, f"{c.op} {c.dtype} D={c.head_dim} {c.label}")]
    variants, jobs, missing = build_variants(kernels, cases, archs)
    if case_filter or kernel_filter:
        missing = []
    if kernel_filter:
        variants = [v for v in variants if re.search(kernel_filter, v.kernel)]
        keys = {v.result["key"] for v in variants}
        jobs = [j for j in jobs if j["key"] in keys]
    results = {}
    workers = jobs_n or max(1, min(len(jobs), os.cpu_count() or 1))
    deadline = None if budget_s is None else t0 + budget_s
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_compile_one, j): j["key"] for j in jobs}
        pending = set(futures)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for f in done:
                res = f.result()
                results[res["key"]] = res
            n = len(results)
            if progress and done and (n % 20 < len(done) or not pending):
                print(f"  compiled {n}/{len(jobs)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            if deadline is not None and time.time() >= deadline and pending:
                for f in pending:
                    f.cancel()
                for f in pending:
                    results[futures[f]] = dict(key=futures[f], ok=False, seconds=0.0,
                                               error=f"not compiled: --budget-s {budget_s:g} s spent")
                break
    for v in variants:
        v.result = results[v.result["key"]]
        v.problems = judge(v, ROLES.get(v.kernel, Role()))
    return dict(triton=triton.__version__, torch=torch.__version__, archs=list(archs), kernels=sorted(kernels),
                helpers=sorted(helpers), missing=missing, variants=variants, seconds=time.time() - t0,
                compiles=len(jobs))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _widths_text(widths: dict) -> str:
    parts = []
    for a, ops in sorted(widths.items()):
        parts.append(f"{a}:" + "/".join(f"{op}{ops[op]}" for op in ("ld", "st") if op in ops))
    return " ".join(parts) or "-"


def summary_line(rep: dict) -> str:
    vs = rep["variants"]
    n_ok = sum(1 for v in vs if v.result.get("ok"))
    n_fail = sum(1 for v in vs if v.problems) + len(rep["missing"])
    n_spill = sum(1 for v in vs if v.result.get("ok") and (v.result["spill_stores"] or v.result["spill_loads"]))
    return (f"triton {rep['triton']}: {n_ok} compiled ({rep['compiles']} distinct compiles), {n_fail} failed, "
            f"{n_spill} spills, {len(rep['kernels'])} kernels, sm_{'/sm_'.join(map(str, rep['archs']))}, "
            f"{rep['seconds']:.0f} s")


def kernel_table(rep: dict) -> list[str]:
    """One row per (kernel, arch): variants, worst registers / spills / shared memory, narrowest widths."""
    rows = ["| kernel | arch | variants | max regs | max spill B | max smem B | narrowest data access (B) | failed |",
            "|---|---|---|---|---|---|---|---|"]
    by = {}
    for v in rep["variants"]:
        by.setdefault((v.kernel, v.cc), []).append(v)
    for (kernel, cc), vs in sorted(by.items()):
        ok = [v for v in vs if v.result.get("ok")]
        widths: dict = {}
        for v in ok:
            for a, ops in v.result["widths"].items():
                for op, b in ops.items():
                    widths.setdefault(a, {})[op] = min(widths.get(a, {}).get(op, b), b)
        rows.append(f"| `{kernel}` | sm_{cc} | {len(vs)} | {max((v.result['regs'] for v in ok), default='-')} | "
                    f"{max((v.result['spill_stores'] + v.result['spill_loads'] for v in ok), default='-')} | "
                    f"{max((v.result['shared'] for v in ok), default='-')} | {_widths_text(widths)} | "
                    f"{sum(1 for v in vs if v.problems)} |")
    for name in rep["missing"]:
        rows.append(f"| `{name}` | - | 0 | - | - | - | - | no case launches it |")
    return rows


def variant_table(rep: dict) -> list[str]:
    rows = ["| kernel | arch | dtype | D | config | regs | spill B | smem B | data access widths (B) | cases | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(rep["variants"], key=lambda v: (v.kernel, v.cc, v.dtype or "", v.head_dim or 0, v.config)):
        r = v.result
        status = "; ".join(v.problems) if v.problems else "ok"
        if r.get("ok"):
            rows.append(f"| `{v.kernel}` | sm_{v.cc} | {v.dtype or '-'} | {v.head_dim or '-'} | {v.config} | {r['regs']} | "
                        f"{r['spill_stores'] + r['spill_loads']} | {r['shared']} | {_widths_text(r['widths'])} | "
                        f"{len(v.labels)} | {status} |")
        else:
            rows.append(f"| `{v.kernel}` | sm_{v.cc} | {v.dtype or '-'} | {v.head_dim or '-'} | {v.config} | - | - | - | - | "
                        f"{len(v.labels)} | {status} |")
    return rows


def problems_text(rep: dict) -> list[str]:
    out = [f"MISSING: kernel {n} is launched by no case in kvpress_kernels/compile_check.py" for n in rep["missing"]]
    for v in rep["variants"]:
        for p in v.problems:
            out.append(f"FAIL {v.kernel} sm_{v.cc} {v.dtype} D={v.head_dim} [{v.config}] ({v.labels[0]}): {p}")
    return out


def write_doc(reps: list[dict], path: Path, command: str) -> None:
    lines = ["# Compile check (generated: do not edit)", "",
             f"Generated by `{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}). Every `@triton.jit` kernel, "
             "every launch configuration its launcher chooses on a GPU, compiled ahead of time for sm_80 and sm_90 by "
             "Triton's compiler; registers, spills (ptxas -v), shared memory (Triton metadata) and the narrowest "
             "global access width per data array (from the PTX, attributed to the `tl.load`/`tl.store` through "
             "`.loc`). See `kvpress_kernels/compile_check.py` for the cases and the rules (DESIGN.md §9).", ""]
    for rep in reps:
        lines += [f"## Triton {rep['triton']}", "", "```", summary_line(rep), "```", ""]
        lines += ["### Per kernel", ""] + kernel_table(rep) + [""]
    rep = reps[0]
    lines += [f"## Every variant (Triton {rep['triton']})", "",
              "`ld16` = the narrowest load of that array is 16 bytes; `cases` = launcher cases that produce this "
              "exact compiler input.", ""] + variant_table(rep) + [""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvpress-kernels compile-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--kernel", default=None, help="only kernels whose name matches this regex")
    p.add_argument("--cases", default=None, help='only cases matching this regex, e.g. "decode_attention fp32 D=256"')
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this arch (repeatable)")
    p.add_argument("--doc", default=None, help="write the generated markdown table here (e.g. docs/COMPILE_CHECK.md)")
    p.add_argument("--json", default=None, help="write the per-variant results as JSON here")
    p.add_argument("--merge", action="append", default=[],
                   help="JSON (--json) of a run under another Triton whose tables --doc includes too")
    p.add_argument("--variants", action="store_true", help="print the per-variant table too")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop compiling after this many seconds; the rest fails as not compiled (local runs)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile-check: unset TRITON_INTERPRET (the interpreter replaces the kernels the check compiles)",
              file=sys.stderr)
        return 2
    rep = run_check(args.jobs, args.kernel, tuple(args.arch or ARCHS), case_filter=args.cases,
                    budget_s=args.budget_s)
    print("\n".join(kernel_table(rep)))
    if args.variants:
        print()
        print("\n".join(variant_table(rep)))
    probs = problems_text(rep)
    if probs:
        print()
        print("\n".join(probs))
    print()
    print(summary_line(rep))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        _dump_json(rep, Path(args.json))
    if args.doc:
        write_doc([rep] + [_load_json(Path(m)) for m in args.merge], Path(args.doc),
                  "make compile-check-triton36 compile-check")
    return 1 if probs else 0


def _dump_json(rep: dict, path: Path) -> None:
    d = dict(rep)
    d["variants"] = [v.__dict__ for v in rep["variants"]]
    path.write_text(json.dumps(d, indent=1, default=str))


def _load_json(path: Path) -> dict:
    d = json.loads(path.read_text())
    d["variants"] = [Variant(**v) for v in d["variants"]]
    return d


if __name__ == "__main__":
    sys.exit(main())
