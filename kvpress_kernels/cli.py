"""The command line: ``kvpress-kernels demo | bench | eval | info | compile-check`` (DESIGN.md §8).

- ``demo``  — SmolLM2-135M on a many-shot prompt: full cache vs ShotKV vs SnapKV, side by side.
- ``bench`` — the benchmark suite of ``benchmarks/`` (every op and the whole compression step).
- ``eval``  — the quality harness (:mod:`kvpress_kernels.evaluation`): methods x keep ratios.
- ``info``  — which backends are available here, and why not.
- ``compile-check`` — every Triton kernel variant compiled for sm_80/sm_90 without a GPU, checked for
  spills, registers and 16-byte K/V accesses (:mod:`kvpress_kernels.compile_check`).

Bad input (an unknown method, a keep ratio outside ``(0, 1]``, an output path that cannot be
written) ends with one line on stderr and exit status 2; an unexpected failure with one line and
status 1 (``KVPRESS_KERNELS_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

PROG = "kvpress-kernels"

#: Methods the ``eval`` and ``demo`` commands know (built by :func:`kvpress_kernels.evaluation.methods.build_method`).
METHOD_NAMES = ("full", "shotkv", "shotkv_decode", "snapkv", "pyramidkv", "chunkkv", "streamingllm", "h2o",
                "adakv", "tova", "knorm", "kvzip", "kvzip_shotkv")
#: Benchmark scripts, in the order they run (``benchmarks/bench_<name>.py``).
BENCH_NAMES = ("end_to_end", "scoring", "selection", "segments", "compaction", "block_compaction", "append",
               "decode_attention", "adakv")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CliError(f"{message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------- validation helpers
def _keep_ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1] (the fraction of tokens KEPT), got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _method(text: str) -> str:
    name = text.strip().lower().replace("-", "_")
    if name not in METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; known: {', '.join(METHOD_NAMES)}")
    return name


def writable_dir(path: str) -> Path:
    """Create ``path`` if needed and check a file can be written in it; CliError otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CliError(f"cannot write to output directory {str(p)!r}: {exc.strerror or exc}") from None
    return p


# --------------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    from . import _backend
    for k, v in _backend.info().items():
        print(f"{k:>22}: {v}")
    try:
        from .evaluation.model import gguf_dir
        model = f"available ({gguf_dir()})"
    except Exception as exc:
        model = f"unavailable: {exc}"
    print(f"{'demo/eval model':>22}: {model}")
    return 0


def benchmarks_dir() -> Path:
    d = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (d / "_common.py").exists():
        raise CliError(f"benchmarks/ not found next to the package ({d}); `bench` runs from a source checkout")
    return d


def cmd_bench(args) -> int:
    out = writable_dir(args.out)
    bdir = benchmarks_dir()
    names = args.ops or [n for n in BENCH_NAMES if (bdir / f"bench_{n}.py").exists()]
    missing = [n for n in names if not (bdir / f"bench_{n}.py").exists()]
    if missing:
        raise CliError(f"no benchmark script for {', '.join(missing)} in {bdir}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise CliError("--device cuda given but no CUDA device is available")
    if str(bdir) not in sys.path:
        sys.path.insert(0, str(bdir))
    import importlib

    from tqdm.auto import tqdm

    import _common as C  # noqa: E402  (benchmarks/_common.py)

    ctx = C.BenchContext(args.device, quick=args.quick, budget_s=args.budget_s, verbose=True)
    t0 = time.perf_counter()
    print(f"device: {ctx.meta['device']} | torch {ctx.meta['torch']} | triton {ctx.meta['triton']} | "
          f"commit {ctx.meta['commit']}" + (" | quick" if args.quick else ""))
    print(f"copy bandwidth (read + write): {ctx.copy_bandwidth_gbs():.1f} GB/s")
    if not ctx.is_gpu:
        print(f"note: {C.TRITON_CPU_NOTE}; CPU rows compare the reference path with its peers.")
    rows: list[dict] = []
    bar = tqdm(names, desc="bench", unit="script")
    for name in bar:
        bar.set_postfix_str(name)
        try:
            mod = importlib.import_module(f"bench_{name}")
            rows += mod.run(ctx)
        except Exception as exc:  # a whole script failing (e.g. an op not there yet) is reported, not fatal
            msg = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:200]
            print(f"  bench_{name} failed: {msg}", file=sys.stderr)
            rows.append({"op": name, "provider": "-", "status": "error", "note": msg, "case": ""})
        C.write_results(rows, out, ctx.meta)     # after every script: a killed run keeps what it measured
    paths = C.write_results(rows, out, ctx.meta)
    if not args.no_plots:
        paths += C.plot_results([r for r in rows if "median_ms" in r], out, ctx.meta)
    print(C.format_table([r for r in rows if "median_ms" in r]))
    failed = [r for r in rows if r["status"] == "error"]
    print(f"\n{len(rows)} rows ({len(failed)} errors) in {time.perf_counter() - t0:.0f} s; wrote "
          + ", ".join(str(p) for p in paths))
    return 1 if failed and args.strict else 0


def cmd_eval(args) -> int:
    from .evaluation import harness
    from .evaluation.tasks import TASK_NAMES

    tasks = args.tasks or None
    if tasks:
        bad = [t for t in tasks if t not in TASK_NAMES]
        if bad:
            raise CliError(f"unknown task {bad[0]!r}; known: {', '.join(TASK_NAMES)}")
    out = writable_dir(args.out)
    cfg = harness.EvalConfig.defaults(quick=args.quick)
    if args.methods:
        cfg.methods = [m for m in args.methods if m != "full"] or cfg.methods
    if args.keep_ratios:
        cfg.keep_ratios = list(args.keep_ratios)
    if args.n:
        cfg.n_examples = args.n
    if tasks:
        cfg.tasks = tasks
    if args.settings:
        cfg.settings = list(args.settings)
    if args.seed is not None:
        cfg.seed = args.seed
    result = harness.run_eval(cfg, progress=True)
    paths = harness.write_outputs(result, out)
    print(harness.format_table(result))
    depth = harness.format_depth_table(result)
    if depth:
        print("\n" + depth)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_demo(args) -> int:
    from . import demo
    return demo.run_demo(keep_ratio=args.keep_ratio, n_shots=args.shots, n_prompts=args.prompts,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, token_method=args.token_method)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Fused kernels for KV-cache compression in a paged KV cache.")
    sub = ap.add_subparsers(dest="command", metavar="{demo,bench,eval,info,compile-check}", parser_class=_Parser)

    p = sub.add_parser("info", help="which backends (reference / triton / cuda) are available here")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="SmolLM2-135M on a many-shot prompt: full cache vs ShotKV vs a token-level method")
    p.add_argument("--keep-ratio", type=_keep_ratio, default=0.3, help="fraction of prompt tokens KEPT (default 0.3)")
    p.add_argument("--shots", type=_positive_int, default=40, help="exemplars in the prompt (default 40)")
    p.add_argument("--prompts", type=_positive_int, default=6, help="prompts to answer (default 6)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=6)
    p.add_argument("--token-method", type=_method, default="snapkv", help="token-level method to contrast (default snapkv)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmark every op and the whole compression step (benchmarks/)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (the CI smoke run)")
    p.add_argument("--out", default="results/bench", help="output directory (default results/bench)")
    p.add_argument("--ops", nargs="+", choices=BENCH_NAMES, metavar="OP",
                   help=f"benchmarks to run (default all): {', '.join(BENCH_NAMES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop measuring new providers after this many seconds (rows say what was skipped)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 when any provider errored")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="quality harness on SmolLM2-135M: methods x keep ratios",
                       description="Quality harness on SmolLM2-135M (CPU): every method at every keep ratio, "
                                   "both settings, against the full cache. The default sweep (5 tasks x 20 "
                                   "examples x 2 settings x 22 configurations) takes over an hour on a 2-core "
                                   "CPU; --quick under a minute.")
    p.add_argument("--quick", action="store_true", help="a few examples, two methods, one ratio (CI smoke run)")
    p.add_argument("--out", default="results/eval", help="output directory (default results/eval)")
    p.add_argument("--methods", nargs="+", type=_method, metavar="METHOD",
                   help=f"methods to compare with the full cache: {', '.join(METHOD_NAMES[1:])}")
    p.add_argument("--keep-ratios", nargs="+", type=_keep_ratio, metavar="R",
                   help="fractions of tokens KEPT, each in (0, 1]")
    p.add_argument("--n", type=_positive_int, default=None, help="examples per task and setting")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to run (default all)")
    p.add_argument("--settings", nargs="+", choices=("query_aware", "query_agnostic", "multi_question", "multi_turn", "multi_turn_at_question"), metavar="SETTING",
                   help="query_aware (question inside the compressed prompt) and/or query_agnostic")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compile-check", add_help=False,
                       help="compile every Triton kernel variant for sm_80/sm_90 (no GPU needed) and check "
                            "spills, registers, 16-byte K/V accesses; `compile-check --help` for options")
    p.set_defaults(func=lambda args: 0)  # dispatched in main() before parsing
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile-check"]:  # its own options (argparse's REMAINDER drops leading --flags)
        from . import compile_check
        return compile_check.main(argv[1:])
    try:
        args = ap.parse_args(argv)
        if not getattr(args, "func", None):
            ap.print_help()
            return 2
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:          # argparse --help
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except Exception as exc:
        if os.environ.get("KVPRESS_KERNELS_TRACEBACK", "0") not in ("", "0"):
            raise
        msg = f"{exc.__class__.__name__}: {exc}".splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"{PROG}: error: {msg} (set KVPRESS_KERNELS_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
