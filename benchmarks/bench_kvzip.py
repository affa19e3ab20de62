"""Benchmark: what KVzip-style compression costs next to the plain prefill and kvpress's ``KVzipPress``.

SmolLM2-135M (30 layers, 9 query / 3 kv heads, D 64, fp32) on CPU, one lookup-task context (the eval's
prompt format, ``--shots`` shots: ~435 tokens at 24). Rows, each in a fresh process (``--one``) so that
its peak memory is its own:

- ``prefill_paged``: ``model(context, logits_to_keep=1)`` into a :class:`PagedCache` without a method
  (the plain prefill every other row is compared with);
- ``prefill_stock``: the same forward with transformers' SDPA attention and a ``DynamicCache``;
- ``kvzip``: ours, the prefill plus :meth:`KVzip.compress_prefilled` (reconstruction pass with the
  scoring op, global selection, eviction) at keep 0.3;
- ``kvzip_bf16``: the same with ``recon_dtype=torch.bfloat16`` (the reconstruction's linear layers under
  bf16 autocast; the cache, the attention and the scores in fp32);
- ``kvpress_kvzip``: kvpress 0.5.5's ``KVzipPress(compression_ratio=0.7)``: ``with press(model):
  model(context)`` (its prefill, then its reconstruction and masking when the context exits).

Time: median of ``--repeat`` calls after one warm-up (wall clock, ``OMP_NUM_THREADS`` as set); ``x_prefill``
is that over ``prefill_paged``'s median of the same run. Peak memory: the peak of live malloc'd bytes
(``mallinfo2``, sampled each millisecond) during the calls minus the bytes live before them (the previous
call's cache freed first), and, coarser, the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident size before them. ``kv_bytes``:
K/V bytes the cache holds afterwards (ours: the pages in use; kvpress: its DynamicCache tensors, since it
masks instead of evicting).

``--interleaved`` (time only): every row in one process, alternated with the order rotating each round,
CPU time per call; ``x_prefill`` is the median over rounds of the call's time over that round's
``prefill_paged`` — on a shared machine the ratio within a round is what stays put.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_kvzip.py --shots 24 96 --repeat 3 \\
        --out docs/results/bench_kvzip.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_kvzip.py --shots 24 96 --repeat 6 --interleaved \\
        --out docs/results/bench_kvzip_interleaved.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS = ("prefill_paged", "prefill_stock", "kvzip", "kvzip_bf16", "kvpress_kvzip")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _HeapPeak:
    """Peak of the bytes glibc's malloc has handed out (``mallinfo2``: heap in use + mmapped blocks, where
    every large tensor lives), sampled every millisecond by a thread while torch ops run without the GIL:
    the live-allocation peak, which the resident set size (memory once touched, not returned) blurs."""

    def __init__(self):
        import ctypes
        import threading

        class _MI(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MI
        self._read = lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(0.001)

    def __enter__(self):
        self.base = self.peak = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _setup(shots: int):
    from kvpress_kernels.evaluation.harness import prepare
    from kvpress_kernels.evaluation.model import load_smollm2
    from kvpress_kernels.evaluation.tasks import generate_task

    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    ids = prepare(generate_task("lookup", 1, seed=1, n_shots=shots)[0], tok).ctx_ids
    return model, tok, ids


def _call(row: str, model, tok, ids, keep: float, state: dict):
    """The callable that runs ``row`` once, leaving its cache in ``state["cache"]``."""
    import kvpress_kernels as kk
    from transformers import DynamicCache

    if row == "prefill_paged":
        def call():
            with kk.compress(model, None) as s:
                state["cache"] = s.prefill(ids)
    elif row == "prefill_stock":
        def call():
            state["cache"] = DynamicCache()
            model(input_ids=ids, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
    elif row in ("kvzip", "kvzip_bf16"):
        recon = torch.bfloat16 if row == "kvzip_bf16" else None

        def call():
            with kk.compress(model, kk.KVzip(keep, tokenizer=tok, recon_dtype=recon)) as s:
                state["cache"] = s.prefill(ids)
    else:
        import kvpress.presses.kvzip_press as kz

        class _Tok:        # KVzipPress loads the tokenizer by name; SmolLM2 here comes from a GGUF file
            @staticmethod
            def from_pretrained(*_a, **_k):
                return tok
        kz.AutoTokenizer = _Tok
        press = kz.KVzipPress(compression_ratio=1.0 - keep)

        def call():
            state["cache"] = DynamicCache()
            with press(model):
                model(input_ids=ids, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
    return call


def interleaved(rows, shots: int, repeat: int, keep: float) -> dict:
    """Every row in one process, alternated (the order rotating each round), CPU time of each call: the
    ratios to ``prefill_paged`` of one round see one machine load. Returns the per-row medians and the
    per-round ratios."""
    model, tok, ids = _setup(shots)
    state: dict = {}
    calls = {r: _call(r, model, tok, ids, keep, state) for r in rows}
    for c in calls.values():
        c()                                  # warm-up
    cpu = {r: [] for r in rows}
    wall = {r: [] for r in rows}
    order = list(rows)
    for i in range(repeat):
        for r in order[i % len(order):] + order[:i % len(order)]:
            state.clear()
            c0, t0 = time.process_time(), time.perf_counter()
            calls[r]()
            cpu[r].append(time.process_time() - c0)
            wall[r].append(time.perf_counter() - t0)
    base = cpu["prefill_paged"]
    out = {"shots": shots, "context_tokens": int(ids.shape[1]), "repeat": repeat, "threads": torch.get_num_threads(),
           "rows": {}}
    for r in rows:
        ratios = [a / b for a, b in zip(cpu[r], base)]
        out["rows"][r] = {"median_cpu_s": statistics.median(cpu[r]), "median_wall_s": statistics.median(wall[r]),
                          "cpu_s": cpu[r], "x_prefill_per_round": ratios, "x_prefill": statistics.median(ratios)}
    return out


def one(row: str, shots: int, repeat: int, keep: float) -> dict:
    model, tok, ids = _setup(shots)
    state: dict = {}
    call = _call(row, model, tok, ids, keep, state)
    call()                                   # warm-up
    state.clear()
    base = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    with _HeapPeak() as heap:
        for _ in range(repeat):
            state.clear()
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    peak = _rss_kb("VmHWM") - base
    cache = state["cache"]
    if hasattr(cache, "kv"):
        kv_bytes = cache.kv.bytes_in_use()
    else:
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return {"row": row, "shots": shots, "context_tokens": int(ids.shape[1]), "median_s": statistics.median(times),
            "times_s": times, "peak_extra_mib": peak / 1024,
            "heap_peak_extra_mib": (heap.peak - heap.base) / 2**20, "kv_bytes": int(kv_bytes),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[24])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--interleaved", action="store_true",
                    help="time only: every row in one process, alternated, CPU time; ratios per round")
    args = ap.parse_args(argv)
    if args.interleaved:
        res = [interleaved(args.rows.split(","), shots, args.repeat, args.keep) for shots in args.shots]
        for r in res:
            for name, row in r["rows"].items():
                print(f"{r['context_tokens']} tokens  {name:14s} median CPU {row['median_cpu_s']:.2f} s  "
                      f"x plain prefill {row['x_prefill']:.2f} (rounds: "
                      + ", ".join(f"{x:.2f}" for x in row["x_prefill_per_round"]) + ")")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"interleaved": res, "argv": sys.argv[1:],
                                                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                 indent=1))
        return 0
    if args.one:
        print(json.dumps(one(args.one, args.shots[0], args.repeat, args.keep)))
        return 0
    rows = []
    for shots in args.shots:
        for row in args.rows.split(","):
            cmd = [sys.executable, __file__, "--one", row, "--shots", str(shots), "--repeat", str(args.repeat),
                   "--keep", str(args.keep)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next(x for x in rows if x["shots"] == r["shots"] and x["row"] == "prefill_paged")
        r["x_prefill"] = r["median_s"] / base["median_s"]
    lines = ["| context tokens | row | median s | x plain prefill | peak live heap MiB | peak RSS MiB | K/V held |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context_tokens']} | {r['row']} | {r['median_s']:.2f} | {r['x_prefill']:.2f} | "
                     f"{r['heap_peak_extra_mib']:.0f} | {r['peak_extra_mib']:.0f} | {r['kv_bytes'] / 2**20:.2f} MiB |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:],
                                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
